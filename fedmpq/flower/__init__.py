"""FedMPQ as a Flower app (``pip install -e ".[flower]"``): :mod:`.server_app` runs the
round loop of ``fedmpq simulate`` over Flower's ``Grid``, :mod:`.client_app` trains a node's
client; both move the same wire payloads (bytes) as the in-process simulation.
:mod:`.simulation` runs them on Flower's simulation engine, :mod:`.local` as a SuperLink and
SuperNodes on 127.0.0.1. The app's
``pyproject.toml`` for ``flwr run`` is in ``flower/`` at the repository root."""
