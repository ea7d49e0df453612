"""Per-model λ of exact-Fisher merging on the demo, chosen by coordinate ascent on validation.

Issue 17: how far honest tuning moves Fisher merging. A full grid of λ_i over 4 models is too big
for 2 cores (4^4 = 256 merges and evaluations), so this walks it by pattern search from
λ = [1, 1, 1, 1]: one model's λ at a time (models in a seeded order each round) is multiplied or
divided by a factor while that raises the mean validation accuracy. Only the validation split
drives the walk: each point is one merge scored on every task's validation rows.

The test split is read once, at the end, and not by this script's choice: the recipe is run with
every visited point as a sweep, and fmerge's eval step chooses the validation winner itself (the
same rule: highest mean validation accuracy, the first on ties, which is also the walk's end
point) and scores only that one on test. The script checks that both choices agree.

    .venv/bin/python bench/fisher_lambda.py                          # normalised, λ_i steps ×/÷ 2
    .venv/bin/python bench/fisher_lambda.py --fisher fisher_exact_1024 --label n1024
    .venv/bin/python bench/fisher_lambda.py --param floor=0.01 --label floor1e-2

Merges and evaluations are cached in the recipe's store, so a rerun costs only the final table.
Writes bench/results/fisher_lambda-<label>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import yaml
from rich.console import Console

import fmerge
from fmerge.api import parse_recipe

ROOT = Path(__file__).resolve().parent.parent


def lambda_text(lam: tuple[float, ...]) -> str:
    return "[" + ",".join(f"{x:g}" for x in lam) + "]"


class Search:
    """Scores λ points of one merge step on the validation split, each once (cached by λ)."""

    def __init__(self, recipe_file: Path, step: str, fisher: str | None, params: dict, scale_free: bool):
        self.recipe_file = recipe_file
        self.data = yaml.safe_load(recipe_file.read_text())
        if step not in self.data["steps"]:
            raise SystemExit(f"{recipe_file} has no step '{step}'.")
        self.step, self.fisher, self.params, self.scale_free = step, fisher, params, scale_free
        self.models = list(self.data["models"])
        evaluation = self.data["steps"]["eval"]
        self.rows = evaluation.get("select_limit") or evaluation.get("limit")  # what fmerge chooses on
        self.scores: dict[tuple, dict] = {}
        self.visited: list[tuple] = []  # in the order scored: fmerge's tie rule is "the first"

    def canonical(self, lam) -> tuple[float, ...]:
        """Fisher merging without a base prior depends on λ only up to scale: smallest λ = 1."""
        lam = tuple(float(x) for x in lam)
        if self.scale_free:
            lam = tuple(x / min(lam) for x in lam)
        # through the printed text, so that 2·√2·√2 and 4 are one point, as in the recipe's sweep
        return tuple(float(x) for x in yaml.safe_load(lambda_text(lam)))

    def point_recipe(self, lam: tuple) -> str:
        data = copy.deepcopy(self.data)
        data.pop("sweep", None)
        merge = data["steps"][self.step]
        # the same YAML text as the final sweep's --set, so both name (and key) the same merge
        merge["params"] = {**merge.get("params", {}), **self.params, "lambda": yaml.safe_load(lambda_text(lam))}
        if self.fisher:
            merge["fisher"] = self.fisher
        data["steps"]["eval"] = {"kind": "eval", "merges": [self.step], "individual": False, "base": False,
                                 "split": "validation", "limit": self.rows}
        return yaml.safe_dump(data, sort_keys=False)

    def score(self, lam) -> dict:
        lam = self.canonical(lam)
        if lam not in self.scores:
            start = time.perf_counter()
            recipe = parse_recipe(self.point_recipe(lam), file=self.recipe_file)
            result = fmerge.run(recipe, only="eval", console=Console(quiet=True))
            tasks = {r["task"]: r["accuracy"] for r in result.rows()
                     if r["variant"] == self.step and r["split"] == "validation"}
            if sorted(tasks) != sorted(self.models):
                raise SystemExit(f"Validation rows for {lambda_text(lam)} cover {sorted(tasks)}, not every task.")
            accuracy = {m: tasks[m] for m in self.models}
            self.scores[lam] = {"lambda": list(lam), "validation": accuracy,
                                "validation_avg": sum(accuracy.values()) / len(accuracy),
                                "seconds": time.perf_counter() - start}
            self.visited.append(lam)
            s = self.scores[lam]
            print(f"  λ={lambda_text(lam):<22} val avg {s['validation_avg']:.4f}  "
                  + " ".join(f"{m} {a:.3f}" for m, a in accuracy.items()) + f"  ({s['seconds']:.0f}s)", flush=True)
        return self.scores[lam]


def coordinate_ascent(search: Search, factors: list[float], start: list[float], rounds: int, seed: int,
                      max_ratio: float, max_points: int | None) -> tuple:
    """Pattern search on validation: for one model at a time (seeded order), multiply its λ by a factor
    while that raises the mean validation accuracy, else divide it likewise; stop when a round moves
    nothing, then repeat with the next (finer) factor. Each step costs one merge and one evaluation,
    so a 4-model walk takes ~8 points a round instead of a 4^4 grid. `max_points` ends the walk
    early (the end point is still the best point visited, which fmerge's choice will confirm)."""
    rng = random.Random(seed)
    current = search.canonical(start)
    best = search.score(current)["validation_avg"]
    for factor in factors:
        for round_ in range(1, rounds + 1):
            moved = False
            order = list(range(len(current)))
            rng.shuffle(order)
            print(f"factor {factor:g}, round {round_}: models in order {[search.models[i] for i in order]}",
                  flush=True)
            for i in order:
                for step in (factor, 1 / factor):
                    went = False
                    while True:
                        candidate = list(current)
                        candidate[i] *= step
                        if max(candidate) / min(candidate) > max_ratio * (1 + 1e-9):
                            break
                        if max_points is not None and len(search.visited) >= max_points \
                                and search.canonical(candidate) not in search.scores:
                            print(f"stopped after {max_points} points (--max-points)", flush=True)
                            return current
                        avg = search.score(candidate)["validation_avg"]
                        if avg <= best:  # strictly better only: on ties the earlier point stays, as fmerge chooses
                            break
                        best, current, went = avg, search.canonical(candidate), True
                    if went:
                        moved = True
                        break  # this model improved going one way: do not try the other
            if not moved:
                break
    return current


def final_run(search: Search, output: str) -> dict:
    """Run the recipe with every visited point as a sweep: fmerge chooses on validation, scores test."""
    sets = [f"{search.step}.params.lambda=" + ",".join(lambda_text(lam) for lam in search.visited),
            f"eval.output={output}", f"eval.merges=[{search.step}]"]
    sets += [f"{search.step}.params.{k}={json.dumps(v)}" for k, v in search.params.items()]
    if search.fisher:
        sets.append(f"{search.step}.fisher={search.fisher}")
    start = time.perf_counter()
    result = fmerge.run(search.recipe_file, sets=sets, only="eval", console=Console(quiet=True))
    (sweep,) = [s for s in result.sweeps["eval"] if s["group"] == search.step]
    chosen = sweep["chosen"]
    test = {r["task"]: r["accuracy"] for r in result.rows() if r["variant"] == chosen and r["split"] == "test"}
    return {"chosen": chosen, "test": test, "test_avg": sum(test.values()) / len(test),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "fisher_lambda.yaml")
    parser.add_argument("--step", default="fisher_normalized", help="the merge step whose λ is searched")
    parser.add_argument("--fisher", help="fisher step the merge reads (default: the recipe's)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="another merge parameter, YAML value (e.g. floor=0.01)")
    parser.add_argument("--factors", default="2", help="step factors of λ_i, coarse to fine (e.g. 2,1.41)")
    parser.add_argument("--max-ratio", type=float, default=16.0, help="largest λ_i / λ_j allowed")
    parser.add_argument("--start", default="1,1,1,1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-points", type=int, help="score at most this many points (a CPU budget)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the order of the models in each round")
    parser.add_argument("--label", default="normalized")
    parser.add_argument("--no-test", action="store_true",
                        help="score the walk on validation only (to compare settings before any test run)")
    args = parser.parse_args()

    params = {k: yaml.safe_load(v) for k, _, v in (p.partition("=") for p in args.param)}
    recipe_file = args.recipe.resolve()
    merge_params = {**yaml.safe_load(recipe_file.read_text())["steps"][args.step].get("params", {}), **params}
    search = Search(recipe_file, args.step, args.fisher, params, scale_free=not merge_params.get("base_prior"))
    factors = [float(x) for x in args.factors.split(",")]
    start = time.perf_counter()
    print(f"{args.label}: coordinate ascent of {args.step} λ, factors {factors}, on validation "
          f"({search.rows} rows per task), fisher={args.fisher or 'recipe'}, params={params}", flush=True)
    end = coordinate_ascent(search, factors, [float(x) for x in args.start.split(",")], args.rounds, args.seed,
                            args.max_ratio, args.max_points)
    search_seconds = time.perf_counter() - start
    point = search.scores[end]
    print(f"\n{len(search.visited)} points in {search_seconds:.0f}s; walk ends at {lambda_text(end)}, "
          f"validation avg {point['validation_avg']:.4f}")
    final = {"chosen": None, "test": None, "test_avg": None, "seconds": None}
    agree = None
    if not args.no_test:
        final = final_run(search, f"../out/fisher_lambda/{args.label}")
        agree = final["chosen"].replace(" ", "") == f"{args.step}[lambda={lambda_text(end)}]"
        print(f"fmerge chose {final['chosen']} ({'same' if agree else 'DIFFERENT'}); final run {final['seconds']:.0f}s")
        header = "| lever | chosen λ | val avg | test avg | " + " | ".join(search.models) + " |"
        print(header + "\n|" + "---|" * (4 + len(search.models)))
        print(f"| {args.label} | {lambda_text(end)} | {point['validation_avg']:.3f} | {final['test_avg']:.3f} | "
              + " | ".join(f"{final['test'][m]:.3f}" for m in search.models) + " |")
    out = ROOT / "bench" / "results" / f"fisher_lambda-{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "label": args.label, "recipe": str(args.recipe), "step": args.step, "fisher": args.fisher,
        "params": params, "factors": factors, "max_ratio": args.max_ratio,
        "max_points": args.max_points, "seed": args.seed, "visited": [search.scores[v] for v in search.visited],
        "walk_end": list(end), "fmerge_chosen": final["chosen"], "choices_agree": agree,
        "validation_avg": point["validation_avg"], "test": final["test"], "test_avg": final["test_avg"],
        "search_seconds": search_seconds, "final_seconds": final["seconds"]}, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
