"""An in-process Flower Grid (no Ray, no sockets): every message goes straight to the ClientApp.

One ``Context`` per virtual node keeps ``context.state`` as a SuperNode would; an exception in the
ClientApp becomes an error reply, as in Flower's runtimes.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 1


class InProcessGrid(Grid):
    def __init__(
        self, client_app, node_configs: list[dict], tamper=None, die_on_call: int = 0, hung=None
    ) -> None:
        """``tamper(message, reply)``, if given, may replace any reply before the server sees it;
        ``die_on_call`` = k > 0: the k-th exchange reaches the nodes, then the server dies (ServerDied);
        ``hung(message)`` true: that message's node never answers it (the exchange then counts a timeout,
        as a real grid waits out ``timeout`` before it returns the other replies)."""
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, 1
        self.client_app = client_app
        self.contexts = {
            1000 + i: Context(RUN_ID, 1000 + i, dict(config), RecordDict(), {})
            for i, config in enumerate(node_configs)
        }
        self.sent: list[Message] = []
        self.batches: list[int] = []  # messages per send_and_receive call
        self.tamper = tamper
        self.die_on_call, self.calls = die_on_call, 0
        self.hung, self.timeouts = hung, 0

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        messages = list(messages)
        self.batches.append(len(messages))
        if self.hung is not None and any(self.hung(message) for message in messages):
            self.timeouts += 1
        for message in messages:
            self.sent.append(message)
            if self.hung is not None and self.hung(message):
                continue
            context = self.contexts[message.metadata.dst_node_id]
            try:
                reply = self.client_app(message, context)
            except Exception as error:
                reply = Message(Error(code=0, reason=repr(error)), reply_to=message)
            replies.append(self.tamper(message, reply) if self.tamper else reply)
        self.calls += 1
        if self.calls == self.die_on_call:
            raise ServerDied(f"the server died in exchange {self.calls}, after the nodes had answered")
        return replies


class ServerDied(Exception):
    """The in-process server was killed (a test's doing)."""
