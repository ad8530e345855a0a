"""The contract between the one round loop and an algorithm, and the registry of algorithms.

An algorithm says what it shares (:meth:`Algorithm.is_shared`, a predicate over the names of the tensors
that travel), how a client trains on what the server sent (:meth:`Algorithm.train`), how the server
combines uploads (:meth:`Algorithm.aggregate`) and how a client predicts (:meth:`Algorithm.predict`). A
client's private state is an ``nn.Module`` of the algorithm's own type (the type parameter ``ClientT``),
owned by the round loop and passed in explicitly; the algorithm object itself holds only frozen
configuration, so the same instance serves the simulator and Flower alike.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from pfedlora.algorithms.state import State, check_schema, combine
from pfedlora.config import AlgorithmOptions, ExperimentConfig
from pfedlora.data import ClientData
from pfedlora.hardware import resolve_device, runs_in_bf16
from pfedlora.metrics import FlopMeter
from pfedlora.models import FeatureClassifier, ModelSettings, build_model, check_homogeneous, model_settings
from pfedlora.registry import Registry
from pfedlora.seeding import torch_generator
from pfedlora.tasks import CLASSIFICATION, TASKS, Task

if TYPE_CHECKING:
    from pfedlora.models.causal_lm import LanguageModelClient

ClientT = TypeVar("ClientT", bound=nn.Module)


@dataclass(frozen=True)
class Upload:
    """What one client sends back: its tensors and the number of training samples behind them."""

    tensors: State
    num_examples: int


@dataclass(frozen=True)
class UploadBound:
    """The most a valid upload of an algorithm can hold: tensors, and bytes of their values."""

    tensors: int
    bytes: int


@dataclass(frozen=True)
class PeftAdapter:
    """LoRA tensors of a client model under ``prefix``, the modules they adapt, the rank and alpha: what PEFT
    needs to load them onto the model (:func:`pfedlora.models.peft_lora.save_peft_state`)."""

    tensors: State
    targets: tuple[str, ...]
    rank: int
    alpha: float
    prefix: str = ""


@dataclass
class ClientContext:
    """What a client's training round needs besides its own state."""

    client_id: int
    arch: str
    server_round: int
    data: ClientData
    generator: torch.Generator
    """Batch order and augmentation of this client in this round."""
    meter: FlopMeter
    task: Task = CLASSIFICATION
    """What the client learns: its loss (:meth:`~pfedlora.tasks.Task.loss`)."""


class Algorithm(ABC, Generic[ClientT]):
    """One federated algorithm; subclasses override the hooks below and nothing else."""

    name: ClassVar[str]
    uploads_global_state: ClassVar[bool] = False
    """True where a client uploads tensors of the broadcast global state's schema and the server averages
    them (so privacy clipping of upload − received, and Gaussian noise on the mean, apply)."""
    one_architecture: ClassVar[bool] = False
    """True where every client must run the same architecture (FedAvg, FedIT: homogeneous references)."""
    adapter_placements: ClassVar[bool] = False
    """True where ``adapter.placement`` changes the algorithm (``compare`` runs one variant per placement)."""
    received: ClassVar[str] = "shared tensors"
    """What a client receives, in words (for error messages)."""
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    """The ``data.task`` values the algorithm serves."""
    schedule_spans_rounds: ClassVar[bool] = False
    """True where a round's training depends on ``federation.rounds`` (a schedule from first to last round),
    so a run cannot be extended to more rounds with the metrics of a longer run from the start."""
    changes_predictions: ClassVar[bool] = True
    """False where training never changes what a client predicts (the zero-shot base): the round loop then
    scores each set of clients once and repeats the figures at later evaluation rounds."""

    options_type: ClassVar[type[AlgorithmOptions]] = AlgorithmOptions
    """The algorithm's own options: the fields of its ``[<name>]`` configuration section (none by default)."""

    def __init__(self, config: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> None:
        self.config = config
        self.input_shape = input_shape
        self.num_classes = num_classes

    @property
    def options(self) -> Any:
        """This algorithm's options (an instance of :attr:`options_type`) in the run's configuration."""
        return self.config.options.get(self.name, self.options_type())

    @functools.cached_property
    def model_settings(self) -> ModelSettings:
        """The ``[model]`` settings and what the federation decides for its models (text views, a common
        feature width)."""
        return model_settings(self.config)

    @functools.cached_property
    def task(self) -> Task:
        """What the federation learns (``data.task``)."""
        return TASKS[self.config.data.task]

    def build_private_model(self, arch: str, generator: torch.Generator) -> nn.Module:
        """A fresh private model of architecture ``arch`` for the run's task: a classifier
        (:func:`~pfedlora.models.build_model`), or a language model with its private adapter
        (:func:`~pfedlora.models.causal_lm.build_language_model`)."""
        if self.task.generative:
            return self.language_model(arch, generator)
        return build_model(arch, self.input_shape, self.num_classes, generator, self.model_settings)

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype a frozen pretrained language model is kept in: bfloat16 where training runs in bf16."""
        bf16 = runs_in_bf16(self.config.train.precision, resolve_device(self.config.device))
        return torch.bfloat16 if bf16 else torch.float32

    def language_model(self, arch: str, generator: torch.Generator, **options: Any) -> LanguageModelClient:
        """A fresh language-model client of ``arch`` with the run's model settings, LoRA targets
        (``adapter.targets``) and frozen base (:attr:`base_dtype`); ``options`` go to
        :func:`~pfedlora.models.causal_lm.build_language_model` (its adapters)."""
        from pfedlora.models.causal_lm import build_language_model

        return build_language_model(
            arch,
            self.model_settings,
            generator,
            targets=self.config.adapter.targets,
            base_dtype=self.base_dtype,
            **options,
        )

    @functools.cached_property
    def probe(self) -> FeatureClassifier:
        """A model of the federation's first architecture: what the family's models have in common (the
        head's name, the feature width)."""
        arch = self.config.federation.architectures[0]
        generator = torch_generator(self.config.seed, "probe")
        return build_model(arch, self.input_shape, self.num_classes, generator, self.model_settings)

    @property
    def head_prefix(self) -> str:
        """State-dict prefix of a model's head (``fc3.`` for the CNNs, ``classifier.`` for transformers)."""
        return f"{self.probe.HEAD_NAME}."

    @property
    def feature_dim(self) -> int:
        """Width of the models' ``features(x)``."""
        return self.probe.feature_dim

    @abstractmethod
    def create_client(self, arch: str, generator: torch.Generator) -> ClientT:
        """A fresh private client state for architecture ``arch``, initialised from ``generator``."""

    @abstractmethod
    def is_shared(self, key: str) -> bool:
        """Whether a tensor named ``key`` may travel between the server and a client (either direction).

        This one predicate is what the channel carries: the round loop sends nothing else, screening
        refuses uploads that hold anything else, and the client-state tensors it selects are the ones that
        travel as they are (:meth:`shared_state`).
        """

    @abstractmethod
    def train(self, client: ClientT, message: State, ctx: ClientContext) -> Upload:
        """Train ``client`` in place for one round, starting from the server's ``message`` (which it first
        takes in with :meth:`receive`)."""

    def receive(self, client: ClientT, message: State) -> None:
        """Take in the server's ``message``: by default it must hold exactly the client's shared tensors
        (:meth:`shared_state`), which it overwrites. Also used to score a client right after a download
        (``federation.evaluate = "after-download"``)."""
        expected = set(self.shared_state(client))
        if set(message) != expected:
            raise ValueError(f"expected the global {self.received} {sorted(expected)}, got {sorted(message)}")
        client.load_state_dict(message, strict=False)  # shapes are checked by load_state_dict

    def shared_state(self, client: ClientT) -> State:
        """The tensors of ``client``'s state that :meth:`is_shared` selects, detached."""
        return {k: v.detach() for k, v in client.state_dict().items() if self.is_shared(k)}

    def check_shared_shapes(self, shared: Mapping[str, State]) -> None:
        """Refuse (AdapterMismatchError) a federation whose architectures (the keys of ``shared``, each with
        its clients' shared tensors) cannot share them: by default they must have one shape everywhere."""
        check_homogeneous(shared)

    def initial_server_state(self, template: ClientT) -> State:
        """The global state before round 1, taken from a freshly initialised template client."""
        return {k: v.clone() for k, v in self.shared_state(template).items()}

    def broadcast(self, server_state: State, client_id: int, server_round: int) -> State:
        """What the server sends to ``client_id`` in ``server_round`` (by default the whole global state)."""
        return server_state

    def aggregate(
        self,
        server_state: State,
        uploads: Sequence[Upload],
        server_round: int,
        meter: FlopMeter | None = None,
    ) -> State:
        """The new global state: by default the uploads combined by :meth:`combine` (FedAvg's
        sample-weighted mean unless ``federation.aggregator`` says otherwise). Training on the server
        charges its steps to ``meter`` (the round's server FLOPs, kept apart from the clients')."""
        if not uploads:
            return server_state
        return self.combine([u.tensors for u in uploads], [u.num_examples for u in uploads])

    def combine(self, states: Sequence[State], weights: Sequence[float]) -> State:
        """Tensor-wise combination of uploads by the configured ``federation.aggregator``."""
        federation = self.config.federation
        return combine(states, weights, federation.aggregator, federation.trim_fraction)

    def check_upload(self, server_state: State, tensors: State) -> None:
        """Raise ValueError naming the problem unless ``tensors`` is what :meth:`aggregate` expects.

        By default: exactly the global state's tensors, with their shapes and dtypes.
        """
        check_schema(tensors, server_state)

    def peft_adapter(self, server_state: State) -> PeftAdapter | None:
        """The global state as an adapter in PEFT's format (written into the run directory at the end), where
        it is one: by default none."""
        return None

    def upload_bound(self, server_state: State) -> UploadBound:
        """The most tensors, and bytes of their values, that an upload :meth:`check_upload` accepts can hold
        (Flower refuses a larger one before reading it). By default: the global state's."""
        return UploadBound(
            len(server_state), sum(t.numel() * t.element_size() for t in server_state.values())
        )

    def predict(self, client: ClientT, x: torch.Tensor) -> torch.Tensor:
        """Class scores of the client's personalized predictor for a batch ``x``."""
        scores: torch.Tensor = client(x)
        return scores


AnyAlgorithm = Algorithm[Any]
"""An algorithm whatever its client type (what the round loop holds)."""

ALGORITHMS: Registry[type[AnyAlgorithm]] = Registry("algorithm")
"""Every algorithm, by name; an algorithm class joins with :func:`register_algorithm`."""

A = TypeVar("A", bound=type[AnyAlgorithm])


def register_algorithm(cls: A) -> A:
    """Class decorator: register ``cls`` under its ``name``."""
    ALGORITHMS.add(cls.name, cls)
    return cls
