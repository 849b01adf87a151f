"""What the authors' unclamped upload would change, for one round: the project saturates
codes at 2^N - 1 on every bit-plane step; the authors' re-quantization does not clamp, and
their upload de-quantizes the unclamped value (ALGORITHM.md, step 6). Their forward clamps
the weight, so it matches ours while a code stays at or beyond the limit.

From a run's checkpoint, every client trains the next round as the federation would, with
the reference step, which also hands out each step's value before the sign fold and the
saturation. Beside every layer the tool keeps the authors' value t (signed, in code units),
stepped with the same update (t' = sign0 * round(v + (sign0 * t - q0)), v the pre-clamp value
of our step), and at the end of local training reports per layer group:

* the share of codes at the limit (ours) and the share where t differs from ours;
* the share where the authors' forward, clamp(t), would differ from ours (there the
  shadow stops being exact: their later steps would see another weight);
* ||delta|| / ||W|| of the aggregated global layer, delta = the mean over clients of
  s * (t - ours) / (2^N - 1) (the server's unweighted mean).

Then it evaluates the aggregated global model as the server would, and once more with the
authors' uploads (global + delta): the accuracy that one round of unclamped uploads changes.
It ignores precision reduction's effect on the excess (fedmpq reassigns the same bits from
round 4 on; see docs/RESULTS.md) and the group-lasso term's dependence on the planes of t.

    python tools/unclamped_upload.py runs/r20/fedmpq_s1

Used for docs/RESULTS.md (ResNet-20: "Saturation").
"""
from __future__ import annotations

import argparse
import sys

import torch

import fedmpq_kernels as fk
from _study import group, initial_server, read_run
from fedmpq import client as client_mod
from fedmpq import config, nn as qn
from fedmpq_kernels.bitplane import reference as ref


def _sign(sign, n):
    """The weights' signs, +-1 float64 (n,) (a negative zero code counts as -1, as the step folds it)."""
    return torch.where(ref.negative_mask(sign, n), -1.0, 1.0).double()


def _signed(codes, sign, n):
    return _sign(sign, n) * codes.reshape(-1).double()


def run_round(c, ds, parts, srv, round_):
    """Train every client one round with the shadow; returns (uploads, per-client deltas
    {key: tensor}, per-client rows [(group, n, at_limit, differs, fwd_differs)])."""
    build = config.model_builder(c, ds)
    tcfg = config.train_config(c)
    shadow = {}  # codes.data_ptr() -> t, float64 (n,)
    real_step, real_train = fk.bitplane_step, client_mod.train_local
    deltas, rows = [], []

    def step(codes, sign, mom, gs, grad, coef, scale, bits, lr, momentum, key):
        n = codes.numel()
        q0 = codes.reshape(-1).double()
        s0 = _sign(sign, n)
        t = shadow.setdefault(codes.data_ptr(), s0 * q0)
        pre = torch.empty(n, dtype=torch.float32)
        out = ref.bitplane_step(codes, sign, mom, gs, grad.reshape(-1).float(), coef.reshape(-1).float(), scale,
                                bits, float(lr), float(momentum), int(key), pre=pre)
        shadow[codes.data_ptr()] = s0 * torch.round(pre.double() + (s0 * t - q0))
        return out

    def traced(model, x, y, cfg, client_id, r, quantized):
        shadow.clear()
        out = real_train(model, x, y, cfg, client_id, r, quantized)
        d = {}
        for name, layer in qn.bit_layers(model):
            n, L = layer.numel, 2 ** layer.bits - 1
            o = _signed(layer.codes.detach(), layer.sign.detach(), n)
            t = shadow.get(layer.codes.data_ptr(), o)
            s = float(layer.scale.detach())
            d[name + ".weight"] = (s * (t - o) / L).float()
            rows.append((group(name), n, float((o.abs() == L).sum()), float((t != o).sum()),
                         float((t.clamp(-L, L) != o).sum())))
        deltas.append(d)
        return out

    fk.bitplane_step, client_mod.train_local = step, traced
    try:
        downloads = srv.downloads(round_, list(range(c["n_clients"])))
        uploads = {k: client_mod.client_update(downloads[k], ds.train_x[parts[k]], ds.train_y[parts[k]], build, tcfg,
                                               k, round_, c["budgets"][k]).upload for k in range(c["n_clients"])}
    finally:
        fk.bitplane_step, client_mod.train_local = real_step, real_train
    return uploads, deltas, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run folder with checkpoint.pt (fedmpq, aqfl or fp8): the round after its last")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    state, c, done = read_run(args.run)
    if c["alg"] == "fp":
        print("fp has no quantized layers", file=sys.stderr)
        return 2
    round_ = done + 1
    ds, parts = config.load_data(c)
    srv = initial_server(c, ds, parts)
    srv.load_state(state["server"])
    uploads, deltas, rows = run_round(c, ds, parts, srv, round_)
    srv.aggregate(round_, uploads)
    acc = (srv.evaluate(ds.test_x, ds.test_y), srv.evaluate_train_mode(ds.test_x, ds.test_y, seed=round_))
    ours = {k: v.clone() for k, v in srv.global_state.items()}
    rel = {}
    for key in deltas[0]:
        dk = torch.stack([d[key] for d in deltas]).mean(0).reshape(ours[key].shape)
        rel[key] = float(dk.norm() / ours[key].float().norm().clamp(min=1e-30))
        srv.global_state[key] = ours[key] + dk.to(ours[key].dtype)
    acc_theirs = (srv.evaluate(ds.test_x, ds.test_y), srv.evaluate_train_mode(ds.test_x, ds.test_y, seed=round_))
    print(f"{c['alg']}, {c['model']} on {c['dataset']}, alpha {c['alpha']}, seed {c['seed']}, scale_lr "
          f"{c['scale_lr']}: round {round_}, all {c['n_clients']} clients\n")
    print("| layers | at the limit, ours | t differs | forward would differ | ||delta|| / ||W||, global |\n"
          "|---|---|---|---|---|")
    groups = list(dict.fromkeys(g for g, *_ in rows))
    for g in groups:
        rs = [r for r in rows if r[0] == g]
        n = sum(r[1] for r in rs)
        keys = [k for k in rel if group(k) == g]
        print(f"| {g} | {100 * sum(r[2] for r in rs) / n:.2f} % | {100 * sum(r[3] for r in rs) / n:.2f} % | "
              f"{100 * sum(r[4] for r in rs) / n:.3f} % | {min(rel[k] for k in keys):.2e}..{max(rel[k] for k in keys):.2e} |")
    print(f"\nglobal accuracy after round {round_}: ours {acc[0]:.4f} (train mode {acc[1]:.4f}), with the authors' "
          f"unclamped uploads {acc_theirs[0]:.4f} (train mode {acc_theirs[1]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
