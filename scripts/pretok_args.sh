# Sourced by pre_tokenize.sh and srun_pre_tokenize.sh: `pretok_out NAME WHO_SETS_RANKS ARGS...`
# prints the --out_dir of a pre-tokenize command line and refuses the flags the launcher sets
# itself (--splits, --rank, --device), naming NAME and who sets them.
pretok_out() {
  local name=$1 setter=$2 out="" i
  shift 2
  local args=("$@")
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
      --out_dir) out="${args[$((i + 1))]:-}" ;;
      --out_dir=*) out="${args[$i]#--out_dir=}" ;;
      --splits | --splits=* | --rank | --rank=* | --device | --device=*)
        echo "$name: do not pass ${args[$i]}; $setter" >&2; return 2 ;;
    esac
  done
  printf '%s\n' "$out"
}
