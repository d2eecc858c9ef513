#!/usr/bin/env bash
# Keep the lowest Twisted, Autobahn and txaio versions that pyproject.toml
# declares true: install the project with its test extra into a new venv
# pinned to exactly those versions (everything else resolves as usual), and
# run the tests that lean hardest on those libraries there. The venv lives in
# a temporary directory, removed on exit.
#
#     tests/floors.sh [PYTEST ARGS]
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/funcnodes-tw-floors.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
tests=(tests/test_protocol.py tests/test_write_path.py tests/test_http.py)

# The floors, read from pyproject.toml so that the two cannot drift apart.
python3 - "$repo/pyproject.toml" >"$work/constraints.txt" <<'EOF'
import re, sys, tomllib

with open(sys.argv[1], "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
for name in ("twisted", "autobahn", "txaio"):
    for spec in dependencies:
        match = re.fullmatch(rf"{name}(\[[^\]]*\])?\s*>=\s*([0-9][0-9.]*)\s*(,.*)?", spec, re.I)
        if match:
            print(f"{name}=={match.group(2)}")
            break
    else:
        sys.exit(f"pyproject.toml declares no '{name}>=' floor")
EOF
echo "floors: $(tr '\n' ' ' <"$work/constraints.txt")"

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" install -q -c "$work/constraints.txt" -e "$repo[test]" \
    --config-settings editable_mode=compat
"$work/venv/bin/pip" list 2>/dev/null | grep -iE '^(twisted|autobahn|txaio) '
cd "$repo"
"$work/venv/bin/pytest" -q -p no:cacheprovider "${tests[@]}" "$@"
