"""A work area that any number of runners share: a folder of work items, each done exactly once.

The runners may be processes on one machine, GPUs, machines with a shared file system, or the
tasks of a SLURM array: each runs the same command on the same folder, takes an item no one
else holds, does it, publishes its result, and takes the next, until every item is finished.
Nothing but the file system coordinates them, through operations that are atomic on POSIX file
systems and NFS (rename, link, exclusive create):

    <dir>/queued/<item>               an item waiting for a runner (an empty file)
    <dir>/running/<item>@<runner>     claimed: renamed out of queued/ by exactly one runner; its
                                      modification time is the runner's heartbeat
    <dir>/finished/<item>.json        the result, published once (a hard link of a complete file)
    <dir>/crashed/<item>@<runner>.txt the error of an attempt that failed
    <dir>/clock/<runner>              touched to read the file system's own clock

An item's state is queued, waiting (queued, but an item it needs is not finished), running,
finished or crashed. A claim whose heartbeat is older than `stale_after` seconds (by the file
system's clock, so machines' clocks need not agree), or whose runner is a dead process on this
machine, is stale: the first runner to rename it back to queued/ wins, and the item is done
again (a runner killed by SIGKILL loses its item, never the work area; one stopped by Ctrl-C or
SIGTERM puts it back in the queue). A result is published
with link(2), which fails if the name exists, so an item finishes once even if a runner that
was thought dead comes back. A crashed item stays crashed for the runners that saw it crash;
starting the command again (`sync`) queues every item that is neither finished nor held, so
re-running resumes a stopped, crashed or interrupted evaluation.
"""
import json
import os
import socket
import threading
import time
import traceback
import uuid
from pathlib import Path

STATES = ("queued", "waiting", "running", "finished", "crashed")


class WorkArea:
    def __init__(self, root, heartbeat=30.0, stale_after=300.0):
        if stale_after <= 2 * heartbeat:
            raise ValueError(f"the stale-claim limit ({stale_after} s) must be more than twice the heartbeat "
                             f"interval ({heartbeat} s).")
        self.root, self.heartbeat, self.stale_after = Path(root), heartbeat, stale_after
        self.runner = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        for name in ("queued", "running", "finished", "crashed", "clock"):
            (self.root / name).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ reading the state
    def finished(self):
        return {p.name[:-5] for p in (self.root / "finished").glob("*.json")}

    def result(self, item):
        return json.loads((self.root / "finished" / f"{item}.json").read_text())

    def queued(self):
        return {p.name for p in (self.root / "queued").iterdir() if not p.name.startswith(".")}

    def claims(self):
        """{claim file name: item} of every item held by a runner."""
        return {p.name: p.name.rsplit("@", 1)[0] for p in (self.root / "running").iterdir() if "@" in p.name}

    def crashed(self):
        """{item: the last error message} of attempts that failed."""
        out = {}
        for p in sorted((self.root / "crashed").glob("*.txt"), key=lambda p: p.stat().st_mtime):  # newest last
            lines = p.read_text(errors="replace").strip().splitlines()
            out[p.name.rsplit("@", 1)[0]] = lines[-1] if lines else ""
        return out

    def states(self, items, needs):
        """{item: state} for `items`; `needs(item)` lists the items it waits for."""
        finished, queued, running = self.finished(), self.queued(), set(self.claims().values())
        crashed = self.crashed()
        out = {}
        for item in items:
            if item in finished:
                out[item] = "finished"
            elif item in running:
                out[item] = "running"
            elif item in queued:
                out[item] = "queued" if all(n in finished for n in needs(item)) else "waiting"
            else:
                out[item] = "crashed" if item in crashed else "queued"
        return out

    # ------------------------------------------------------------------ changing it
    def sync(self, items):
        """Queue every item that is neither queued, held nor finished (a new work area, or a crashed item).

        The checks follow an item's life (queued -> running -> finished), so an item that moves on
        while it is looked at is seen in its next place; the exclusive create refuses a duplicate.
        """
        for item in items:
            if (self.root / "queued" / item).exists() or item in self.claims().values() or \
                    (self.root / "finished" / f"{item}.json").exists():
                continue
            try:
                os.close(os.open(self.root / "queued" / item, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass

    def now(self):
        """The file system's clock: the modification time of a file just touched."""
        probe = self.root / "clock" / self.runner
        probe.touch()
        return probe.stat().st_mtime

    def recover_stale(self):
        """Put back in the queue the items of runners that stopped beating; returns them."""
        now, recovered = self.now(), []
        host = socket.gethostname()
        for claim, item in self.claims().items():
            path = self.root / "running" / claim
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            runner = claim.rsplit("@", 1)[1]
            if age <= self.stale_after and not (runner.rsplit(".", 2)[0] == host and not _alive(runner)):
                continue
            try:
                os.rename(path, self.root / "queued" / item)
                recovered.append(item)
            except FileNotFoundError:  # another runner recovered it, or its owner finished
                pass
        return recovered

    def claim(self, item):
        """Take `item` from the queue; False if another runner took it first."""
        try:
            os.rename(self.root / "queued" / item, self.root / "running" / f"{item}@{self.runner}")
            return True
        except FileNotFoundError:
            return False

    def run_item(self, item, work):
        """Do a claimed item: `work()` returns its JSON-able result, published once. Returns (state, result)."""
        claim = self.root / "running" / f"{item}@{self.runner}"
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(claim, stop), daemon=True)
        beat.start()
        try:
            result = work()
        except (KeyboardInterrupt, SystemExit):  # stopped (Ctrl-C, SIGTERM): the item goes back to the queue
            stop.set()
            beat.join()
            try:
                os.rename(claim, self.root / "queued" / item)
            except FileNotFoundError:
                pass
            raise
        except Exception as e:  # the item crashed: record why, release the claim, go on with others
            stop.set()
            beat.join()
            text = f"{''.join(traceback.format_exception(e))}\n{type(e).__name__}: {e}\n"
            tmp = self.root / "crashed" / f".{item}@{self.runner}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.root / "crashed" / f"{item}@{self.runner}.txt")
            _unlink(claim)
            return "crashed", f"{type(e).__name__}: {e}"
        stop.set()
        beat.join()
        published = self._publish(item, {**result, "item": item, "runner": self.runner})
        _unlink(claim)
        return ("finished" if published else "duplicate"), result

    def _beat(self, claim, stop):
        while not stop.wait(self.heartbeat):
            try:
                os.utime(claim)
            except FileNotFoundError:  # recovered by another runner: our result will lose the race to publish
                return

    def _publish(self, item, result):
        tmp = self.root / "finished" / f".{item}@{self.runner}.tmp"
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        try:
            os.link(tmp, self.root / "finished" / f"{item}.json")
            return True
        except FileExistsError:
            return False
        finally:
            _unlink(tmp)

    def loop(self, items, needs, work, poll=10.0, log=print):
        """Take and do items until every one is finished or none can run. `work(item)` returns the result.

        Items whose needs are finished are taken in the order of `items`; while the others wait for
        items held by other runners, the runner polls (recovering stale claims). Returns the
        {item: state} at the end.
        """
        seen_crash = set()
        while True:
            self.recover_stale()
            finished, queued = self.finished(), self.queued()
            ready = [i for i in items if i in queued and i not in seen_crash and all(n in finished for n in needs(i))]
            for item in ready:
                if not self.claim(item):
                    continue
                started = time.time()
                state, result = self.run_item(item, lambda: work(item))
                if state == "crashed":
                    seen_crash.add(item)
                log(json.dumps({"item": item, "state": state, "seconds": round(time.time() - started, 1),
                                "runner": self.runner, **({"error": result} if state == "crashed" else {})}))
                break  # look at the work area again: new items may be ready, claims may be stale
            else:
                states = self.states(items, needs)
                if all(s == "finished" for s in states.values()):
                    return states
                blocked_by_crash = {i for i in items if states[i] != "finished" and
                                    _blocked(i, needs, states, seen_crash)}
                if all(states[i] == "finished" or i in blocked_by_crash for i in items):
                    return states  # nothing left that this runner could do or wait for
                time.sleep(poll)


def _blocked(item, needs, states, crashed):
    """Whether `item` crashed here, or needs (directly or not) an item that did."""
    if item in crashed or states[item] == "crashed":
        return True
    return any(states[n] != "finished" and _blocked(n, needs, states, crashed) for n in needs(item))


def _alive(runner):
    """Whether the process of a runner id `host.pid.token` on this machine is alive."""
    try:
        pid = int(runner.rsplit(".", 2)[1])
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError, IndexError):
        return True  # not ours to judge: wait for its heartbeat to go stale


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
