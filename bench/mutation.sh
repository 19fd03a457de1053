#!/usr/bin/env bash
# Mutation testing of one legcomp module with mutmut 3.x, within a time budget.
#
#   bench/mutation.sh MODULE [MINUTES]
#
# MODULE: quantification | io | preprocessing | evaluation | training (training/loop.py) | all
# MINUTES: wall-clock budget (default 30). mutmut is interrupted when it is spent; the mutants tested by
#   then are kept (mutants/) and reported, the rest show as "not checked"; a rerun goes on from there
#   (it runs only the module's mutants not checked yet or surviving; ONLY=survived only the survivors,
#   FULL=1 all of them again). SAMPLE=N: only N of them, drawn at random (seed SAMPLE_SEED, default 0), for
#   an unbiased estimate of the score of a module too big to run whole in the budget.
#
# Needs: pip install -e ".[dev]" (mutmut); the configuration is [tool.mutmut] in pyproject.toml (which files
# are mutated, which tests run). Run from anywhere; it works in the repository root (mutants/ is written there).
# Environment: MUTMUT_CHILDREN (parallel test processes, default 1), NICE (niceness, default 19),
#   OMP_NUM_THREADS (default 1): by default it keeps out of the way of other work on the machine.
#
# Prints killed / survived (and any other outcome: timeout, no tests, not checked, ...) per module, and the
# score killed / (killed + survived). Surviving mutants: `mutmut results`, `mutmut show NAME`, `mutmut browse`.
set -euo pipefail

usage="usage: bench/mutation.sh quantification|io|preprocessing|evaluation|training|all [MINUTES]"
module=${1:?$usage}
minutes=${2:-30}
case "$module" in
    quantification|io|preprocessing|evaluation) pattern="legcomp.$module.*" ;;
    training) pattern="legcomp.training.loop.*" ;;
    all) pattern="" ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
[[ "$minutes" =~ ^[0-9]+$ ]] && (( minutes > 0 )) || { echo "MINUTES must be a whole number > 0" >&2; exit 2; }
command -v mutmut >/dev/null || { echo "mutmut is not installed: pip install -e \".[dev]\"" >&2; exit 2; }

cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# mutmut reruns every mutant that matches the names it is given, killed ones included; so once mutants/
# holds results, name only this module's mutants that are not checked yet or survived (after new tests)
# and keep the verdicts of the others. FULL=1: rerun them all (after a change to the code under test);
# ONLY=survived: rerun only the survivors (after writing tests for them).
targets=(${pattern:+"$pattern"})
if [[ -z "${FULL:-}" && -f mutants/mutmut-stats.json ]]; then
    if [[ -n "$pattern" ]] && ! mutmut results --all=true | grep "^ *${pattern%\*}" >/dev/null; then
        # a module mutmut has not listed yet (newly configured): a run that tests nothing makes its mutants
        echo "mutation.sh: making the mutants of $module first"
        nice -n "${NICE:-19}" mutmut run "legcomp.no_such_module.*" >/dev/null 2>&1 || true
    fi
    mapfile -t targets < <(mutmut results --all=true | python3 -c '
import random
import sys
prefix = sys.argv[1].rstrip("*")
names = []
for line in sys.stdin:
    name, sep, outcome = line.strip().rpartition(": ")
    if sep and "__mutmut_" in name and name.startswith(prefix) and outcome in sys.argv[2].split(","):
        names.append(name)
if sys.argv[3]:
    names = random.Random(int(sys.argv[4])).sample(names, min(int(sys.argv[3]), len(names)))
print("\n".join(names))' "$pattern" "${ONLY:-not checked,survived}" "${SAMPLE:-}" "${SAMPLE_SEED:-0}")
    [[ "${targets[*]}" == "" ]] && targets=()
    echo "mutation.sh: ${#targets[@]} mutants ${ONLY:-not checked,survived}${SAMPLE:+ (a random sample)} (FULL=1 reruns all)"
fi
started=$(date +%s)
rc=0
if (( ${#targets[@]} > 0 )) || [[ -z "$pattern" ]]; then
    # SIGINT first (mutmut stops as on Ctrl-C), SIGKILL a minute later if it has not
    timeout --signal=INT --kill-after=60 "$((minutes * 60))" \
        nice -n "${NICE:-19}" mutmut run --max-children "${MUTMUT_CHILDREN:-1}" "${targets[@]}" || rc=$?
fi
elapsed=$(( $(date +%s) - started ))
if (( rc == 124 || rc == 137 )); then
    echo "mutation.sh: the $minutes min budget ran out after ${elapsed} s; untested mutants count as not checked"
elif (( rc != 0 )); then
    echo "mutation.sh: mutmut run ended with exit code $rc after ${elapsed} s" >&2
fi

# `mutmut results --all=true` prints "    <module>.x_<function>__mutmut_<n>: <outcome>" per mutant
read -r -d '' summarise <<'PY' || true
import sys
from collections import Counter, defaultdict

prefix = sys.argv[1].rstrip("*")
by_module = defaultdict(Counter)
for line in sys.stdin:
    name, sep, outcome = line.strip().rpartition(": ")
    if not sep or "__mutmut_" not in name or not name.startswith(prefix):
        continue
    parts = name.split(".")  # module parts, then x_<function> or x\u01c1<class>\u01c1<method>
    cut = next((i for i in range(len(parts) - 1, -1, -1) if parts[i].startswith(("x_", "x\u01c1"))), len(parts) - 1)
    by_module[".".join(parts[:cut])][outcome] += 1
if not by_module:
    sys.exit("mutation.sh: no mutant results for " + (prefix or "any module"))


def score(c):
    tested = c["killed"] + c["survived"]
    return f"{100 * c['killed'] / tested:.0f} %" if tested else "-"


others = sorted({o for c in by_module.values() for o in c} - {"killed", "survived"})
head = ["module", "killed", "survived", *others, "total", "score"]
total = sum(by_module.values(), Counter())
rows = [[mod, c["killed"], c["survived"], *(c[o] for o in others), sum(c.values()), score(c)]
        for mod, c in sorted(by_module.items())]
rows.append(["all", total["killed"], total["survived"], *(total[o] for o in others), sum(total.values()),
             score(total)])
width = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
for r in [head, *rows]:
    print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, width))))
PY
mutmut results --all=true | python3 -c "$summarise" "$pattern"
