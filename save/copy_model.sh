#!/usr/bin/env bash
# Copy checkpoint folder A to B, renaming infos_A*.pkl / histories_A*.pkl to infos_B*.pkl / histories_B*.pkl,
# so that `train.py --start_from save/B --id B` continues from A (stage 2 of the README).
# Run it from save/ (as the original README does: cd save; ./copy_model.sh A B) or from anywhere with
# folder names relative to the current directory or to save/.
#
# B must not hold a run already (its checkpoints, infos, histories, tensorboard events): that run would be lost, or
# mixed with A's. -f (or --replace, or SATIC_REPLACE=1) replaces it: B's run files are removed first, whole, then
# A's copied in (B's other files stay). A run still writing into B (train.py holds B/.satic.lock) is never replaced.
# The (slow) copy is made in a hidden folder beside B, then moved in by renames: a copy interrupted before that
# leaves B as it was.
set -euo pipefail
usage="usage: copy_model.sh [-f|--replace] A B   (copies checkpoint folder A to B and renames its infos/histories files)"
replace=${SATIC_REPLACE:-0}
args=()
for arg in "$@"; do
  case "$arg" in
    -f|--replace) replace=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "error: unknown option $arg; $usage" >&2; exit 2 ;;
    *) args+=("$arg") ;;
  esac
done
if [ ${#args[@]} -ne 2 ]; then
  echo "$usage" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
src=${args[0]}; dst=${args[1]}
if [ ! -d "$src" ] && [ -d "$here/$src" ]; then src="$here/$src"; dst="$here/$dst"; fi
if [ ! -d "$src" ]; then
  echo "error: checkpoint folder '${args[0]}' not found (looked in $(pwd) and $here)" >&2
  exit 2
fi
if [ -e "$dst" ] && [ ! -d "$dst" ]; then
  echo "error: '$dst' is a file, not a folder: choose another destination" >&2
  exit 2
fi
a=$(basename "$src"); b=$(basename "$dst")
if [ "$(cd "$src" && pwd -P)" = "$(mkdir -p "$dst" && cd "$dst" && pwd -P)" ]; then
  echo "error: '$src' and '$dst' are the same folder" >&2
  exit 2
fi

# The files of a run (misc/run/runfolder.py's CHECKPOINT_FILE, and train.py's tensorboard events).
run_files() {
  find "$1" -maxdepth 1 -type f \( -name 'model.pth' -o -name 'model-*.pth' -o -name 'optimizer.pth' \
    -o -name 'infos_*.pkl' -o -name 'histories_*.pkl' -o -name 'checkpoint_*.json' \
    -o -name 'events.out.tfevents.*' \) -printf '%f\n' | sort
}
held=$(run_files "$dst")
if [ -n "$held" ]; then
  if [ "$replace" != 1 ]; then
    echo "error: '$dst' already holds a run ($(echo "$held" | head -3 | tr '\n' ' ')...): copying '$src' there would" \
         "replace it; choose another folder, or pass -f (--replace) to remove that run first" >&2
    exit 2
  fi
  if [ -e "$dst/.satic.lock" ] && ! flock -n "$dst/.satic.lock" true 2>/dev/null; then
    echo "error: a training run is writing into '$dst' (it holds $dst/.satic.lock): stop it first" >&2
    exit 2
  fi
fi

staging="$(dirname "$dst")/.$b.$$-copying"
trap 'rm -rf "$staging"' EXIT
rm -rf "$staging"
mkdir -p "$staging"
cp -r "$src"/. "$staging"/
rm -f "$staging/.satic.lock"  # A's lock file belongs to A's runs
(
  cd "$staging"
  for f in infos_"$a"*.pkl histories_"$a"*.pkl; do
    [ -e "$f" ] || continue
    mv -f "$f" "${f/_$a/_$b}"
  done
)
if [ -n "$held" ]; then
  echo "$held" | while read -r f; do rm -f "$dst/$f"; done
  echo "removed the run that was in $dst ($(echo "$held" | wc -l) files)"
fi
# Every file of the copy moves in by a rename (one file system); a subfolder B already has merges as cp does.
for entry in "$staging"/* "$staging"/.[!.]*; do
  [ -e "$entry" ] || continue
  name=$(basename "$entry")
  if [ -d "$entry" ] && [ -d "$dst/$name" ]; then cp -r "$entry"/. "$dst/$name"/; else mv -f "$entry" "$dst/"; fi
done
echo "copied $src to $dst"
