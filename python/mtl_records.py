"""The JSON-lines record of a comparison (written by mtl_runs.main): a ``meta`` line, then one
line per finished run. Runs are appended as they finish, so an interrupted sweep keeps what ran;
running the same command again reads the record, checks that it was made under the same
protocol and runs only what is missing.

A run is identified by (config, aggregator, seed, label noise): the noise level is part of the
run's key, so the sweeps of one program at several noise levels can share one record. The
protocol (sizes, batch, learning rate, rho, patience, epochs) must be the same for every run of
a record, or the comparison would not be paired.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PROTOCOL = ("sizes", "batch", "lr", "rho", "patience", "min_epochs", "epochs")


def protocol(args: dict) -> dict:
    """The protocol of a sweep from its (resolved) arguments. ``epochs`` is the fixed number of
    epochs, or the maximum when ``patience`` > 0; records made before patience existed ran a
    fixed number of epochs (patience 0, no minimum)."""
    patience = args.get("patience") or 0
    return {"sizes": args["sizes"], "batch": args["batch"], "lr": args["lr"],
            "rho": args["rho"], "patience": patience,
            "min_epochs": (args.get("min_epochs") or 0) if patience else 0,
            "epochs": args["max_epochs"] if patience else args["epochs"]}


def run_key(run: dict) -> tuple[str, str, int, float]:
    return run["config"], run["aggregator"], run["seed"], float(run.get("label_noise", 0.0))


def read(path: Path) -> tuple[dict, list[dict]]:
    """The meta line and the runs of a record. A last line cut short (the process was killed
    while writing it) is dropped: that run is simply run again."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        raise SystemExit(f"{path} is empty: remove it to start the sweep afresh")
    meta = json.loads(lines[0])["meta"]
    runs = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines):
                raise SystemExit(f"{path}: line {i} is not JSON") from None
            print(f"{path}: dropping the unfinished last line {i}")
    return meta, runs


def start(path: Path, meta: dict) -> set[tuple]:
    """Open the record at ``path`` for a sweep described by ``meta``: create it (the meta line)
    if it does not exist, else check that it was made by the same program under the same
    protocol. Returns the keys of the runs it already holds."""
    if not path.exists():
        write(path, {**meta, "wall_s": 0.0, "invocations": []}, [])
        return set()
    old, runs = read(path)
    old_protocol = old.get("protocol") or protocol(old["args"])
    diff = {k: (old_protocol[k], meta["protocol"][k]) for k in PROTOCOL
            if old_protocol[k] != meta["protocol"][k]}
    if old["program"] != meta["program"] or diff:
        raise SystemExit(f"{path} holds runs of {old['program']} under another protocol "
                         f"(recorded, asked): {diff}; choose another --out or remove the file")
    write(path, old, runs)  # without a cut-off last line, so appends start on a new line
    return {run_key(r) for r in runs}


def append(path: Path, run: dict) -> None:
    """Add one finished run (flushed at once, so it survives an interrupted sweep)."""
    with open(path, "a") as f:
        f.write(json.dumps(run) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finish(path: Path, invocation: dict) -> None:
    """Note this invocation (command, commit, parallelism, wall time, runs made) in the meta
    line; the record's ``wall_s`` is the sum over invocations."""
    meta, runs = read(path)
    meta.setdefault("invocations", []).append(invocation)
    meta["wall_s"] = round(meta.get("wall_s", 0.0) + invocation["wall_s"], 1)
    write(path, meta, runs)


def write(path: Path, meta: dict, runs: list[dict]) -> None:
    """Replace the record atomically (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in [{"meta": meta}, *runs]))
    os.replace(tmp, path)
