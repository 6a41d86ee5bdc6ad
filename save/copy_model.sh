#!/usr/bin/env bash
# Copy checkpoint folder A to B, renaming infos_A*.pkl / histories_A*.pkl to infos_B*.pkl / histories_B*.pkl,
# so that `train.py --start_from save/B --id B` continues from A (stage 2 of the README).
# Run it from save/ (as the original README does: cd save; ./copy_model.sh A B) or from anywhere with
# folder names relative to the current directory or to save/.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: copy_model.sh A B   (copies checkpoint folder A to B and renames its infos/histories files)" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
src=$1; dst=$2
if [ ! -d "$src" ] && [ -d "$here/$src" ]; then src="$here/$src"; dst="$here/$2"; fi
if [ ! -d "$src" ]; then
  echo "error: checkpoint folder '$1' not found (looked in $(pwd) and $here)" >&2
  exit 2
fi
a=$(basename "$src"); b=$(basename "$dst")
mkdir -p "$dst"
cp -r "$src"/. "$dst"/
cd "$dst"
for f in infos_"$a"*.pkl histories_"$a"*.pkl; do
  [ -e "$f" ] || continue
  mv -f "$f" "${f/_$a/_$b}"
done
echo "copied $src to $dst"
