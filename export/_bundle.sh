# Sourced by serve_vllm.sh and serve_trtllm.sh (not run alone): one place for the bundle argument and the
# pre-serve check, so both servers refuse the same broken or tampered bundles.
#
#   bundle_dir_checked "<server args hint>" "$@"   sets $dir (absolute) and $PYTHON, or exits 2 with the usage
#
# The check (loader rules + manifest sha256) runs when dg_pipeline is importable by $PYTHON (default python3);
# DG_SKIP_CHECK=1 skips it.

bundle_dir_checked() {
  local hint="$1"
  shift
  if [[ $# -lt 1 || ! -d "$1" ]]; then
    echo "usage: $0 <export dir> [$hint...]   (a dir written by: python -m dg_pipeline stage=export)" >&2
    exit 2
  fi
  dir="$(cd "$1" && pwd)"
  PYTHON="${PYTHON:-python3}"
  if [[ "${DG_SKIP_CHECK:-0}" != "1" ]] && "$PYTHON" -c "import dg_pipeline" 2>/dev/null; then
    "$PYTHON" -m dg_pipeline stage=check input="$dir" logger=none
  fi
}
