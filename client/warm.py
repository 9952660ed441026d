"""A warm session from the client's side: one secure session kept open for queries as they arrive, each
answered in about its online time because its material was prepared ahead (`secure.core.stream`).

    with WarmSession(ClientSettings(server=("127.0.0.1", 7000), security=...), WarmSettings(pool=4)) as s:
        s.wait_warm()                      # optional: until the pool is full
        rows = s.classify(images)          # normalised N x C x H x W; one record per image

The session holds its control connection, its client party process (with the opened weights and its
pool) and the links to the server and the dealer. When the session breaks (the server or the dealer
went away, it idled past the server's --idle-timeout, its image budget is used, its lifetime is over),
the query is sent again on a fresh session, at most `reconnects` times: the fresh session has new
seeds, so no correlation is used twice. Library code: it takes `ClientSettings` and `WarmSettings`.
"""

from __future__ import annotations

import multiprocessing.connection
import pickle
import select
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from client.session import (ClientSettings, check_relu_choice, check_session_reply, fetch_info, meeting_point,
                            public_plan, records, relu_protocol_for, with_retries)
from secure.control import auth, protocol
from secure.control.workers import PartyJob, Worker, recv_done

if TYPE_CHECKING:
    import torch

    from secure.core.plan import PublicPlan

IDLE_MARGIN_S = 2.0  # start a fresh session this long (at most a quarter of it) before the server's idle timeout


@dataclass(frozen=True)
class WarmSettings:
    batch_size: int = 1  # images per query (a shorter last chunk is padded with zero images)
    pool: int = 4  # queries prepared ahead
    refill: str = "idle"  # secure.core.stream.REFILL_POLICIES: idle (not beside a running query) or eager
    max_images: int | None = None  # images to reserve per session against a quota (None: the server decides)
    reconnects: int = 2  # a query whose session broke is sent again on a fresh session this many times


class SessionBroken(protocol.ControlError):
    """The warm session ended under a query (or before it): a fresh session may answer it."""


class WarmSession:
    def __init__(self, settings: ClientSettings, warm: WarmSettings | None = None):
        self.settings, self.warm = settings, warm or WarmSettings()
        self.plan: PublicPlan | None = None
        self.relu: str | None = None
        self.label_only = False
        self.sessions = 0  # sessions opened: 1 + reconnects
        self.queries = 0
        # Each ended session's client-party summary (queries, pool peak, ...) and the dealer's refill rate for it
        # (queries of correlations per second of its compute, as the server passes it on).
        self.summaries: list[dict] = []
        self._ch = self._worker = None
        self._sid = ""
        self._stream: dict = {}
        self._images = 0  # images classified in the current session
        self._last = 0.0  # when the current session last answered

    # -- opening and closing ----------------------------------------------------------------------------
    def __enter__(self) -> "WarmSession":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        from secure.core.stream import StreamSettings
        try:
            StreamSettings(batch_size=self.warm.batch_size, pool=self.warm.pool, refill=self.warm.refill).check()
        except ValueError as exc:
            raise protocol.ControlError(str(exc)) from None
        if self.settings.engine != "fast":
            raise protocol.ControlError("warm sessions run the fast engine: drop --engine crypten")
        check_relu_choice(self.settings)
        info = fetch_info(self.settings)
        if info.get("insecure_tfp"):
            raise protocol.ControlError("the server runs without a dealer (--insecure-tfp): warm sessions need one")
        self.plan = public_plan(info)
        self.label_only = bool(info.get("label_only"))
        self.relu = relu_protocol_for(self.settings, self.plan, info)
        with_retries(self.settings, self._start)  # a busy or restarting server: --retries

    def _start(self) -> None:
        from secure.core.stream import StreamSettings
        s, w = self.settings, self.warm
        ch = auth.open_channel(*s.server, s.security, s.connect_timeout, s.timeout, "server")
        try:
            ch.send("session", plan_hash=self.plan.plan_hash, engine=s.engine, relu_protocol=self.relu,
                    stream={"batch_size": w.batch_size, "pool": w.pool, "refill": w.refill,
                            "max_images": w.max_images})
            reply = protocol.expect(ch.recv(s.timeout), "session")
            sid, tfp = check_session_reply(reply, s, self.relu)
            if tfp:
                raise protocol.ControlError("the server answered without a dealer: warm sessions need one")
            stream = protocol.field(reply, "stream", dict)
            idle = float(protocol.field(stream, "idle_timeout_s", (int, float), lambda t: 0 < t <= 1e6, "seconds"))
            most = stream.get("max_images")
            rdv, _ = meeting_point(reply, sid, tfp, s)
            worker = Worker("pi-client-warm")
        except BaseException:
            ch.close()
            raise
        worker.start_job(PartyJob("client", rdv, engine=s.engine, public=self.plan, relu_protocol=self.relu,
                                  stream=StreamSettings(batch_size=w.batch_size, pool=w.pool, refill=w.refill,
                                                        idle_timeout_s=idle, max_images=most)))
        self._ch, self._worker, self._sid, self._stream = ch, worker, sid, {**stream, "idle_timeout_s": idle}
        self._images, self._last = 0, time.monotonic()
        self.sessions += 1

    def close(self) -> None:
        """End the session: the client party says so to the server, which ends its own and the dealer's."""
        if self._worker is None:
            return
        try:
            self._worker.conn.send_bytes(pickle.dumps(("end",)))
            final = self._await(("ok", "error"), min(self.settings.timeout, 30.0), final=True)
            done = recv_done(self._ch, min(self.settings.timeout, 10.0))
            if final and final[0] == "ok":
                rate = (done or {}).get("dealer_refill_queries_per_s")
                self.summaries.append({**final[1], "dealer_refill_queries_per_s": rate})
        except (SessionBroken, OSError, protocol.ProtocolError):
            pass  # the session was over already
        finally:
            self._drop()

    def _drop(self) -> None:
        if self._worker is not None:
            self._worker.stop()
        if self._ch is not None:
            self._ch.close()
        self._ch = self._worker = None

    @property
    def session_id(self) -> str:
        return self._sid

    # -- queries --------------------------------------------------------------------------------------
    def classify(self, x: torch.Tensor, names: list[str] | None = None) -> list[dict]:
        """One record per image of `x` (normalised, N x C x H x W): class, probability (None when the server
        is label-only), and per query its `wall_s` (from handing over the images to the answer),
        `online_s` (the client party's online phase) and `wait_s` (waiting for material)."""
        import torch
        from secure.core.plaintext import check_input
        check_input(x, self.plan.input_shape)
        names = names or [f"image{self.queries + i}" for i in range(len(x))]
        b, out = self.warm.batch_size, []
        for start in range(0, len(x), b):
            chunk = x[start:start + b].float()
            real = len(chunk)
            if real < b:
                chunk = torch.cat([chunk, torch.zeros(b - real, *chunk.shape[1:])])
            t0 = time.perf_counter()
            answer, reconnects = self._query(chunk)
            wall = time.perf_counter() - t0
            rows = records(self.plan, names[start:start + real],
                           [{"logits": answer["logits"][:real], "label_only": self.label_only}])
            for row in rows:
                row.update(wall_s=wall, online_s=answer["online_s"], wait_s=answer["wait_s"],
                           pool_level=answer["pool_level"], query=answer["query"], session_id=self._sid,
                           reconnects=reconnects)
            out += rows
        return out

    def _query(self, chunk) -> tuple[dict, int]:
        for attempt in range(self.warm.reconnects + 1):
            try:
                if not self._usable():
                    self._drop()
                    with_retries(self.settings, self._start)
                self._worker.conn.send_bytes(pickle.dumps(("query", chunk)))
                answer = self._await(("answer",), self.settings.timeout)[1]
            except (SessionBroken, OSError) as exc:
                self._drop()
                if attempt == self.warm.reconnects:
                    raise protocol.ControlError(f"the warm session broke {attempt + 1} time(s) under one query; "
                                                f"last: {exc}") from None
                continue
            self.queries += 1
            self._images += len(chunk)
            self._last = time.monotonic()
            return answer, attempt
        raise AssertionError("unreachable")

    def _usable(self) -> bool:
        """The current session can take the next query: open, not ended by the server, not about to idle
        out, with budget left."""
        if self._worker is None or not self._worker.process.is_alive():
            return False
        if self._ch.pending() or select.select([self._ch], [], [], 0)[0]:
            return False  # the server said done or error (or hung up): the session is over
        idle = self._stream["idle_timeout_s"]
        if time.monotonic() - self._last > idle - min(IDLE_MARGIN_S, idle / 4):
            return False
        most = self._stream.get("max_images")
        return most is None or self._images + self.warm.batch_size <= most

    def status(self) -> dict:
        """The client party's pool: level, prepared, held and peak bytes (and a preparation error)."""
        if not self._usable():
            self._drop()
            with_retries(self.settings, self._start)
        self._worker.conn.send_bytes(pickle.dumps(("status",)))
        return self._await(("status",), self.settings.timeout)[1]

    def wait_warm(self, timeout_s: float = 120.0, poll_s: float = 0.05) -> dict:
        """Wait until the client's pool is full; its status. (The server's pool fills alongside.)"""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.status()
            if st.get("error"):
                raise SessionBroken(f"preparing the pool failed: {st['error']}")
            if st["level"] >= st["pool"] or time.monotonic() > deadline:
                return st
            time.sleep(poll_s)

    def _await(self, kinds: tuple[str, ...], timeout_s: float, final: bool = False):
        """The worker's next message of one of `kinds`, watching the server's control connection; a party
        that ended or failed, or a server that ended the session, is SessionBroken."""
        deadline = time.monotonic() + timeout_s
        conn, proc = self._worker.conn, self._worker.process
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SessionBroken(f"no answer from the client party within {timeout_s:g} s")
            ready = multiprocessing.connection.wait([conn, proc.sentinel, self._ch], min(remaining, 1.0))
            if conn in ready or conn.poll():
                try:
                    message = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    raise SessionBroken("the client party process ended") from None
                if message[0] in kinds:
                    return message
                if message[0] == "error":
                    raise SessionBroken(f"the secure computation failed: {message[1]}")
                if message[0] == "ok":
                    self.summaries.append(message[1])
                    raise SessionBroken("the session ended")
                continue
            if proc.sentinel in ready and not conn.poll():
                raise SessionBroken(f"the client party process died (exit code {proc.exitcode})")
            if (self._ch in ready or self._ch.pending()) and not final:
                try:
                    msg = protocol.recv(self._ch, 1.0)
                except protocol.ProtocolError as exc:
                    raise SessionBroken(f"the server's control connection: {exc}") from None
                raise SessionBroken(f"the server ended the session ({msg['type']}"
                                    + (f": {protocol.one_line(str(msg.get('message')), 200)})" if msg.get("message")
                                       else ")"))
