"""An in-process Grid for fast strategy tests: every message is handled by calling the ClientApp directly.

No Ray, no network: ``send_and_receive`` runs each node's ClientApp in turn. A node can be
made to drop out (no reply: a straggler) or to raise (an interruption of the whole run).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    """K virtual nodes with partition ids 0..K-1, served by ``client_app`` in this process."""

    def __init__(self, client_app, num_nodes: int, *, run_config=None, silent=(), interrupt_at=None):
        self.client_app = client_app
        # the identity a ServerApp process has (messages read it when they are created)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.nodes = {1000 + p: p for p in range(num_nodes)}
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": p, "num-partitions": num_nodes},
                                      state=RecordDict(), run_config=dict(run_config or {})) for nid, p in self.nodes.items()}
        self.silent = set(silent)
        self.interrupt_at = interrupt_at  # (message type, server round): raise KeyboardInterrupt there
        self.sent: list[Message] = []

    def set_run(self, run):  # pragma: no cover - not used
        self._run = run

    @property
    def run(self):  # pragma: no cover - not used
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages):  # pragma: no cover - send_and_receive does everything
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            nid = msg.metadata.dst_node_id
            rnd = int(msg.content.config_records["config"].get("server-round", 0)) if "config" in msg.content.config_records else 0
            if self.interrupt_at is not None and (msg.metadata.message_type, rnd) == self.interrupt_at:
                raise KeyboardInterrupt(f"interrupted at {self.interrupt_at}")
            if self.nodes[nid] in self.silent and msg.metadata.message_type == "train":
                continue
            try:
                replies.append(self.client_app(msg, self.contexts[nid]))
            except Exception as exc:  # noqa: BLE001 - what Flower's runtimes do: an error reply, not a crash
                replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(exc)), reply_to=msg))
        return replies
