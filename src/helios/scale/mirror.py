"""Streams started on rank 0 alone and run by every rank: for apps whose work arrives at one process (`helios serve`).

Under torchrun a generation needs every process (parallel.py), but a server takes its requests in one. `lead(pipe)`,
on rank 0, wraps `pipe.stream` so that each call is announced to the other ranks, which `follow(pipe)` and start
the same stream. Whatever changes a running stream is decided on rank 0 and sent to the others at the point where it
takes effect, so that all ranks compute alike:
- going on to the next chunk: sent when rank 0's consumer asks for it; a consumer that stops asking (a cancelled job)
  is followed by the next stream's announcement, or by the end;
- stopping between two steps: rank 0's on_step answer, after every step;
- a steering change at a chunk boundary: the change is sent, and its prompt is then encoded as every prompt is under
  parallelism (by rank 0, for all). So a change is encoded when its chunk starts, not when it arrives: encoding
  at arrival would start a collective from a request thread.

The announcements travel on a gloo group of their own whose timeout is years: the other ranks wait there for as long
as the server is idle. If rank 0 dies, its sockets close and they stop at once.
"""

from __future__ import annotations

import inspect
import sys
import threading
import traceback
from contextlib import closing
from datetime import timedelta

import torch.distributed as dist

CONTROL_TIMEOUT = timedelta(days=3650)


class _End(BaseException):
    """Rank 0 ended (its app stops): raised wherever a follower waits, through any stream it runs."""


class _Channel:
    """Messages from rank 0 to the others, in order."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)  # every rank calls this, in step
        self.lock = threading.Lock()  # the end may be sent from another thread than the streams' messages

    def send(self, message) -> None:
        with self.lock:
            dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        if box[0] == ("end",):
            raise _End()
        return box[0]


def lead(pipe):
    """Rank 0: announce every `pipe.stream` call to the followers. Returns `end()`, to call when the app stops."""
    channel, start = _Channel(), pipe.stream
    signature = inspect.signature(start)

    def stream(*args, on_step=None, steering=None, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments  # prompt or plan, opts, negative, media, resume
        channel.send(("stream", arguments, steering is not None))

        def agreed(info) -> bool:
            stop = bool(on_step(info)) if on_step is not None else False
            channel.send(stop)
            return stop

        sent = _SentSteering(steering, channel) if steering is not None else None
        return _announced(start(**arguments, on_step=agreed, steering=sent), channel)

    pipe.stream = stream
    return lambda: channel.send(("end",))


def _announced(chunks, channel):
    while True:
        channel.send(("next",))
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        yield chunk


def follow(pipe) -> None:
    """Ranks other than 0: run every stream rank 0 announces, until it announces the end."""
    channel = _Channel()
    try:
        message = channel.receive()
        while True:  # every message here announces a stream
            message = _mirror(pipe, channel, *message[1:])
    except _End:
        return


def _mirror(pipe, channel, arguments: dict, steered: bool):
    """Run one announced stream as far as rank 0 goes; returns the message that ends it."""
    steering = _ReceivedSteering(channel) if steered else None
    try:
        stream = pipe.stream(**arguments, on_step=lambda info: channel.receive(), steering=steering)
    except Exception:  # rank 0 met the same error (bad input) and goes on to its next stream
        _report()
        return channel.receive()
    with closing(stream):
        while (message := channel.receive())[0] == "next":
            try:
                next(stream)
            except StopIteration:
                pass  # rank 0 saw the end too
            except Exception:
                _report()
    return message


def _report() -> None:
    print(f"helios (rank {dist.get_rank()}): a mirrored stream failed, as on rank 0:", file=sys.stderr)
    traceback.print_exc()


class _SentSteering:
    """Rank 0's side of a Steering (steering.py): its changes, sent to the other ranks at each chunk boundary."""

    def __init__(self, steering, channel: _Channel):
        self.steering, self.channel = steering, channel

    def bind(self, encode) -> None:
        """Not bound: the prompt is encoded when its chunk takes it (see the module docstring)."""

    def take(self):
        pending = self.steering.take()
        change = None if pending is None else pending[0]
        self.channel.send(change)
        return None if change is None else (change, None)


class _ReceivedSteering:
    """The other ranks' side: rank 0's change at each chunk boundary."""

    def __init__(self, channel: _Channel):
        self.channel = channel

    def bind(self, encode) -> None:
        pass

    def take(self):
        change = self.channel.receive()
        return None if change is None else (change, None)
