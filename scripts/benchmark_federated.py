#!/usr/bin/env python
"""Benchmark federated training (``medsec federate``) and write the ``federated`` section of BENCHMARKS.md.

On PneumoniaMNIST (official split, 28x28) the same network (``model=small_cnn`` with GroupNorm) trains
over 5 sites, IID and Dirichlet (alpha 0.3) partitions, with FedAvg and FedProx (mu 0.01), against
centralised training (``medsec train``, epochs = rounds x local epochs); then the cost of protected
updates (SecAgg+ and CKKS against plain aggregation, 3 sites, 2 rounds). Sites run in-process, one at a
time (``federation.backend=inprocess``): deterministic, no Ray start-up.

    python scripts/benchmark_federated.py                 # about 12-14 minutes on 2 CPU cores (extrapolated)
    python scripts/benchmark_federated.py --quick --output /tmp/B.md   # about 2-3 minutes
    python scripts/benchmark_federated.py --hippocampus --resnet18-ckks   # the full section
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from medsec import api
from medsec.utils.benchmarks import (
    benchmark_parser,
    command,
    fmt,
    machine_summary,
    mark,
    parse_args,
    produced_by,
    publish,
)

SECTION = "federated"
DATA = ["data=medmnist", "data.source.flag=pneumoniamnist", "data.num_workers=0", "data.augment=false",
        "data.batch_size=32", "model=small_cnn", "model.batch_norm=group", "task.scheduler=null"]
SEED = 42
TRAIN_ONLY = ["callbacks.rich_progress_bar=null", "callbacks.model_summary=null"]
FED = ["federation.backend=inprocess"]
QUICK = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
HIPPOCAMPUS = ["experiment=hippocampus_unet3d", "data.num_workers=0"]
GOAL_IID = 0.02
GOAL_SECAGG = 2.5
GOAL_CKKS = 3.0
REFERENCES = [
    ("Peng et al., JAMIA 30(1):54, 2023 (42 hospitals, COVID-19 chest X-ray): local models AUROC 0.94, "
     "FedAvg 0.95"),
    ("BatchCrypt (Zhang et al., USENIX ATC 2020): homomorphic encryption of updates inflates computation and "
     "communication by orders of magnitude unless values are batched into each ciphertext"),
]


def run_verb(verb: str, overrides: list[str], out: Path, reuse: bool) -> tuple[dict[str, Any], float]:
    """``medsec VERB OVERRIDES`` in this process into ``out``; with ``reuse``, what a finished run
    of an earlier invocation left there (its result and its recorded wall seconds)."""
    record = out / "benchmark_wall.json"
    result = out / ("federated.json" if verb == "federate" else "metrics.json")
    if reuse and record.exists() and result.exists():
        return json.loads(result.read_text()), json.loads(record.read_text())["seconds"]
    start = time.perf_counter()
    outcome = api.run(verb, overrides, out)
    wall = time.perf_counter() - start
    record.write_text(json.dumps({"seconds": wall}))
    return outcome, wall


def federate(name: str, overrides: list[str], out: Path, reuse: bool = False) -> dict[str, Any]:
    """``medsec federate OVERRIDES``: test metrics of the round the validation AUROC picks (the rule
    ``medsec train`` picks its checkpoint by), wall minutes, per-round cost."""
    summary, wall = run_verb("federate", overrides, out, reuse)
    with open(out / "rounds.csv", newline="") as handle:
        rounds = [r for r in csv.DictReader(handle) if int(r["round"]) > 0]  # round 0: the initial model
    chosen = summary.get("best") or summary.get("final") or {}
    row = {"name": name, "command": command("federate", overrides), "chosen": chosen, "minutes": wall / 60,
           "auroc": chosen.get("test/auroc"), "acc": chosen.get("test/acc"),
           "round_s": statistics.median(float(r["seconds"]) for r in rounds),
           "bytes": statistics.median(int(r["bytes_sent"]) + int(r["bytes_received"]) for r in rounds)}
    print(f"[federated] {name}: auroc={fmt(row['auroc'])} (round {chosen.get('round')}) round={row['round_s']:.2f} s "
          f"bytes={row['bytes']:.0f} in {row['minutes']:.1f} min", flush=True)
    return row


def centralised(args: Any, work: Path, seed: int) -> dict[str, Any]:
    """``medsec train`` on all the data for rounds x local epochs."""
    overrides = [*DATA, f"seed={seed}", *TRAIN_ONLY, f"trainer.max_epochs={args.rounds * args.local_epochs}",
                 "logger=none", *(QUICK if args.quick else [])]
    metrics, wall = run_verb("train", overrides, work / f"centralised_{seed}", args.reuse)
    print(f"[federated] centralised, seed {seed}: auroc={fmt(metrics.get('test/auroc'))} in {wall / 60:.1f} min",
          flush=True)
    return {"name": "centralised", "command": command("train", overrides), "auroc": metrics.get("test/auroc"),
            "acc": metrics.get("test/acc"), "minutes": wall / 60}


def over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row from runs that differ in their seed only: means, and the AUROC's spread."""
    aurocs = [r["auroc"] for r in runs if r["auroc"] is not None]
    accs = [r["acc"] for r in runs if r["acc"] is not None]
    return {**runs[0], "seeds": len(runs), "auroc": statistics.mean(aurocs) if aurocs else None,
            "auroc_sd": statistics.stdev(aurocs) if len(aurocs) > 1 else None,
            "acc": statistics.mean(accs) if accs else None, "minutes": statistics.mean(r["minutes"] for r in runs)}


def accuracy_rows(args: Any, work: Path) -> list[dict[str, Any]]:
    """Centralised and IID FedAvg over ``args.seeds`` seeds; IID FedProx and Dirichlet FedAvg /
    FedProx with the first seed; ``args.sites`` sites."""
    seeds = [SEED + i for i in range(args.seeds)]
    rows = [over_seeds([centralised(args, work, seed) for seed in seeds])]
    for partition in ("iid", "dirichlet"):
        for strategy in ("fedavg", "fedprox"):
            label = f"{'IID' if partition == 'iid' else f'Dirichlet {args.alpha:g}'}, " \
                    f"{'FedAvg' if strategy == 'fedavg' else 'FedProx'}"
            runs = []
            for seed in seeds if (partition, strategy) == ("iid", "fedavg") else seeds[:1]:
                overrides = [*DATA, f"seed={seed}", *FED, f"federation.num_sites={args.sites}",
                             f"federation.rounds={args.rounds}", f"federation.local_epochs={args.local_epochs}",
                             f"federation.partition={partition}", f"federation.alpha={args.alpha}",
                             f"federation.strategy={strategy}", f"federation.proximal_mu={args.mu}",
                             *(QUICK if args.quick else [])]
                runs.append(federate(label, overrides, work / f"{partition}_{strategy}_{seed}", args.reuse))
            rows.append(over_seeds(runs))
    return rows


def ckks_contexts(work: Path) -> list[str]:
    """Create the sites' secret and the server's public CKKS context; the overrides that name them."""
    from medsec.federated.he_aggregation import make_site_context, public_context

    site, server = work / "keys" / "site.ctx", work / "keys" / "server.ctx"
    if not (site.exists() and server.exists()):  # an earlier invocation's keys are kept (never overwritten)
        (work / "keys").mkdir(parents=True, exist_ok=True)
        server.write_bytes(public_context(make_site_context(site)))
    return [f"federation.ckks.site_context={site}", f"federation.ckks.public_context={server}"]


def cost_rows(model: list[str], args: Any, work: Path) -> list[dict[str, Any]]:
    """Plain, SecAgg+ and CKKS aggregation of ``model`` over 3 IID sites, ``args.cost_rounds`` rounds,
    each run ``args.cost_repeats`` times, interleaved (plain, SecAgg+, CKKS, plain, ...), so that a
    busy spell of the machine does not fall on one variant alone; the median over the repeats."""
    base = [*DATA, f"seed={SEED}", *model, *FED, "federation.num_sites=3", f"federation.rounds={args.cost_rounds}",
            "federation.partition=iid", *(QUICK if args.quick else [])]
    variants = [("plain", []), ("SecAgg+", ["federation.secure_aggregation=secagg+"]),
                ("CKKS", ["federation.secure_aggregation=ckks", *ckks_contexts(work)])]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in variants}
    for repeat in range(args.cost_repeats):
        for name, extra in variants:
            out = work / f"{name.lower().replace('+', 'plus')}_{repeat}"
            runs[name].append(federate(name, [*base, *extra], out))
    return [{**found[0], "round_s": statistics.median(r["round_s"] for r in found),
             "bytes": statistics.median(r["bytes"] for r in found)} for found in runs.values()]


def hippocampus_rows(args: Any, work: Path) -> list[dict[str, Any]]:
    """MSD hippocampus (``experiment=hippocampus_unet3d``): centralised for ``args.hippocampus_rounds``
    epochs and FedAvg over 3 IID sites for as many rounds; test Dice of the weights validation picks."""
    rounds, quick = args.hippocampus_rounds, QUICK if args.quick else []
    train = [*HIPPOCAMPUS, f"seed={SEED}", *TRAIN_ONLY, f"trainer.max_epochs={rounds}", "logger=none", *quick]
    metrics, wall = run_verb("train", train, work / "hippocampus_centralised", args.reuse)
    central = {"name": "centralised", "command": command("train", train), "dice": metrics.get("test/dice_mean"),
               "minutes": wall / 60}
    federated = federate("FedAvg, 3 IID sites", [*HIPPOCAMPUS, f"seed={SEED}", *FED, "federation.num_sites=3",
                                                   f"federation.rounds={rounds}", *quick], work / "hippocampus",
                         args.reuse)
    federated["dice"] = federated["chosen"].get("test/dice_mean")
    return [central, federated]


def accuracy_table(rows: list[dict[str, Any]]) -> list[str]:
    base = rows[0]
    lines = ["| training | seeds | test AUROC | test ACC | AUROC vs centralised | wall min (per seed) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        diff = None if row is base or row["auroc"] is None else row["auroc"] - base["auroc"]
        spread = f" ± {row['auroc_sd']:.3f}" if row["auroc_sd"] is not None else ""
        lines.append(f"| {row['name']} | {row['seeds']} | {fmt(row['auroc'])}{spread} | {fmt(row['acc'])} | "
                     f"{'' if diff is None else f'{diff:+.3f}'} | {row['minutes']:.1f} |")
    return lines


def cost_table(rows: list[dict[str, Any]]) -> list[str]:
    plain = rows[0]
    lines = ["| aggregation | s/round (median) | vs plain | bytes sent+received/round | vs plain |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['round_s']:.2f} | {r['round_s'] / plain['round_s']:.2f} | {r['bytes']:,.0f} | "
              f"{r['bytes'] / plain['bytes']:.2f} |" for r in rows]
    return lines


def goals(accuracy: list[dict[str, Any]], cost: list[dict[str, Any]]) -> list[str]:
    central, iid_avg = accuracy[0], accuracy[1]
    skewed = max(accuracy[3:5], key=lambda r: r["auroc"] or 0.0)
    plain, secagg, ckks = (r["round_s"] for r in cost)
    iid_ok = iid_avg["auroc"] is not None and central["auroc"] - iid_avg["auroc"] <= GOAL_IID
    return ["Goals:",
            (f"- IID FedAvg within {GOAL_IID} AUROC of centralised ({fmt(iid_avg['auroc'])} vs "
            f"{fmt(central['auroc'])}): {mark(iid_ok)}"),
            (f"- non-IID, the better of FedAvg/FedProx: {skewed['name']}, AUROC {fmt(skewed['auroc'])} "
            f"({skewed['auroc'] - central['auroc']:+.3f} vs centralised)"),
            (f"- SecAgg+ round time at most {GOAL_SECAGG:g}x plain ({secagg / plain:.2f}x): "
            f"{mark(secagg <= GOAL_SECAGG * plain)}"),
            (f"- CKKS round time at most {GOAL_CKKS:g}x plain for the small CNN ({ckks / plain:.2f}x): "
            f"{mark(ckks <= GOAL_CKKS * plain)}")]


def markdown(accuracy: list[dict[str, Any]], cost: list[dict[str, Any]], extra: list[str], args: Any,
             started: dt.datetime) -> str:
    lines = [
        f"{produced_by('benchmark_federated.py', started)}. Machine: {machine_summary()}.", "",
        "PneumoniaMNIST 28x28, official test split; the server evaluates the global model. Every row: "
        "`model=small_cnn` with GroupNorm (`model.batch_norm=group`: BatchNorm running statistics are "
        "site-specific and do not average well), batch 32, no augmentation, AdamW without a scheduler. "
        f"{args.sites} sites, {args.rounds} rounds x {args.local_epochs} local epoch(s); partitions IID and "
        f"Dirichlet alpha {args.alpha:g} (label skew); FedProx mu {args.mu:g}. Centralised: `medsec train` on all "
        f"the training data for {args.rounds * args.local_epochs} epochs. Both pick the weights to test by "
        "validation AUROC: centralised the best epoch's checkpoint, federated the best round's global model "
        "(`checkpoints/best.ckpt`, `best` in `federated.json`). Centralised and IID FedAvg: mean ± standard "
        f"deviation over seeds {SEED}-{SEED + args.seeds - 1} (initialisation and batch order; the same "
        "partition); the other rows: seed 42. Sites run in-process one at a time "
        "(`federation.backend=inprocess`: deterministic, no Ray start-up), so wall time is the sum of the "
        "sites' work, not that of a real, parallel federation."
        + (" **Quick smoke run: a few batches per epoch, numbers are not meaningful.**" if args.quick else ""),
        "", *accuracy_table(accuracy), "",
        (f"Cost of protected updates: the same network, 3 IID sites, {args.cost_rounds} rounds, each variant run "
        f"{args.cost_repeats} times interleaved; median over the rounds and repeats of the round's wall seconds and "
        "of the bytes the server sent and received. CKKS: the sites hold a "
         "secret TenSEAL context and the server a public one (`medsec.federated.he_aggregation.make_site_context` "
         "and `public_context`, in the work directory); the server sees only ciphertexts and cannot evaluate."), "",
        *cost_table(cost), "", *goals(accuracy, cost), "", *extra,
        *([] if args.hippocampus and args.resnet18_ckks else [
            ("Not measured in this run: `--hippocampus` (MSD hippocampus over 3 sites, test Dice) and "
             "`--resnet18-ckks` (CKKS cost for ResNet-18)."), ""]),
        "Published anchors (different data, networks and sites):", *[f"- {ref}" for ref in REFERENCES], "",
        "Reproduce a row with its command:", "",
        *[f"- {row['name']}: `{row['command']}`" for row in [*accuracy, *cost]]]
    return "\n".join(lines)


def optional_rows(args: Any, work: Path) -> list[str]:
    """The sections of ``--hippocampus`` and ``--resnet18-ckks``, when asked for."""
    lines: list[str] = []
    if args.hippocampus:
        rows = hippocampus_rows(args, work)
        lines += [(f"MSD hippocampus (`experiment=hippocampus_unet3d`: 3D U-Net, 185 training cases), "
                   f"{args.hippocampus_rounds} epochs against {args.hippocampus_rounds} rounds of one local epoch over "
                   "3 IID sites; test Dice (mean of both structures, 52 test cases) of the weights the validation Dice "
                   "picks:"), "", "| training | test Dice | wall min |", "|---|---:|---:|",
                  *[f"| {r['name']} | {fmt(r['dice'])} | {r['minutes']:.1f} |" for r in rows], "",
                  *[f"- {r['name']}: `{r['command']}`" for r in rows], ""]
    if args.resnet18_ckks:
        lines += ["Cost of protected updates for ResNet-18 (`model=resnet18`):", "",
                  *cost_table(cost_rows(["model=resnet18"], args, work / "resnet18")), ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, SECTION, quick="a short smoke run")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the non-IID rows")
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx proximal mu")
    parser.add_argument("--cost-rounds", type=int, default=2)
    parser.add_argument("--cost-repeats", type=int, default=2, help="interleaved repeats of each cost variant")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the finished accuracy and hippocampus runs in --work (the cost rows always rerun)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the centralised and IID FedAvg rows")
    parser.add_argument("--hippocampus", action="store_true", help="add MSD hippocampus over 3 sites (Dice)")
    parser.add_argument("--hippocampus-rounds", type=int, default=20)
    parser.add_argument("--resnet18-ckks", action="store_true", help="add the CKKS cost for ResNet-18")
    parser.add_argument("--work", type=Path, default=None)
    args = parse_args(parser, argv, quick={"sites": 3, "rounds": 2, "cost_rounds": 2, "seeds": 2,
                                                         "hippocampus_rounds": 1})
    started = dt.datetime.now(dt.timezone.utc)
    work = args.work or Path(tempfile.mkdtemp(prefix="medsec_federated_"))
    accuracy = accuracy_rows(args, work)
    cost = cost_rows([], args, work / "cost")
    publish(args.output, SECTION, markdown(accuracy, cost, optional_rows(args, work), args, started))


if __name__ == "__main__":
    main()
