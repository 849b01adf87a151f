"""A warm SuperExec for FedMPQ's SuperNodes: ``python -m fedmpq.flower.superexec`` takes the
arguments of ``flower-superexec`` and runs it, but starts each ClientApp by forking itself
instead of a fresh ``flwr-clientapp`` process.

Why: Flower 1.42 runs every message a SuperNode receives in a new ClientApp process (both
isolation modes; ``--isolation process`` only moves the launching to a SuperExec). Each one
imports Python, Flower, torch and fedmpq and reads the dataset again: about 3 s of CPU on
this project's machine, against about 0.05 s of training per client on the default run.
This process imports all of it once; a fork then costs milliseconds, and the child runs
Flower's own ClientApp runtime (``run_clientapp``) for its one message, as ``flwr-clientapp``
would. Use it with ``flower-supernode --isolation process --port P`` and
``--runtime-api-address 127.0.0.1:P`` (one per SuperNode; :class:`fedmpq.flower.local.LocalFederation`
with ``warm=True`` does both).
"""
from __future__ import annotations

import os
import signal
import sys
import traceback

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec import run_superexec as _run_superexec
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult
from flwr.supercore.tls import validate_and_resolve_root_certificates


class ForkExecutor(SubprocessExecutor):
    """Flower's subprocess executor, with ClientApps forked from this warm process."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP or spec.runtime_dependency_install:
            return super().launch(spec)  # anything else, as Flower does it
        pid = os.fork()
        if pid:
            return LaunchResult.accepted()
        code = 1
        try:  # the child: one ClientApp run, then out without running the parent's exit handlers
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            if spec.suppress_output:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            from flwr.supernode.runtime.run_clientapp import run_clientapp

            run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                          certificates=validate_and_resolve_root_certificates(spec.root_certificates_path,
                                                                              spec.insecure),
                          parent_pid=spec.parent_pid, runtime_dependency_install=False)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # said, not swallowed: the child exited 1 with nothing on stderr
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def warm_up() -> None:
    """Import what every ClientApp needs, once, before any fork."""
    import torch  # noqa: F401

    import fedmpq.flower.client_app  # noqa: F401  (fedmpq, its kernels, Flower's app API)


def main() -> None:
    # Flower polls the SuperNode for new ClientApp tasks once a second by default; a fork
    # costs milliseconds, so a second of waiting would be most of a client's round.
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    warm_up()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # finished ClientApps are reaped by the kernel
    _run_superexec.get_executor = lambda *a, **k: ForkExecutor()
    from flwr.supercore.cli.flower_superexec import flower_superexec

    flower_superexec()


if __name__ == "__main__":
    main()
