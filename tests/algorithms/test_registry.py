import pytest

from pfedlora.algorithms import ALGORITHMS, Algorithm, algorithm_class
from pfedlora.config import load_config
from pfedlora.errors import ConfigError


def test_the_configuration_accepts_exactly_the_registered_algorithms():
    for name, cls in ALGORITHMS.items():
        task = "classification" if "classification" in cls.tasks else cls.tasks[0]
        overrides = [f"algorithm={name}", f"data.task={task}"]
        if task == "language-modeling":
            overrides += ["data.dataset=kjv", "federation.architectures=smollm2-r8"]
        assert load_config(None, overrides).algorithm == name
    with pytest.raises(ConfigError, match=f"allowed: {', '.join(ALGORITHMS)}$"):
        load_config(None, ["algorithm=fedfoo"])


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_registered_algorithm_imports_and_knows_its_name(name):
    cls = algorithm_class(name)
    assert issubclass(cls, Algorithm)
    assert cls.name == name
    assert cls.__doc__ and cls.__module__.startswith("pfedlora.algorithms.")
    module_doc = __import__(cls.__module__, fromlist=["_"]).__doc__ or ""
    assert "arXiv" in module_doc or "DOI" in module_doc  # every algorithm cites its paper


def test_unknown_algorithm_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="allowed: pfedlora"):
        algorithm_class("fedfoo")
