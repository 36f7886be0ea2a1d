
# --- packaging/completions/sameport-default-subcommand.bash, appended by packaging/debian/rules ---
# `run` is sameport's default subcommand: `sameport --listen A --upstream B` is `sameport run
# --listen A --upstream B`. The script above offers only the root's own flags before a
# subcommand, so a line whose first argument is a flag is completed as the same line with `run`
# inserted would be.
_sameport_default_subcommand() {
    if [[ ${COMP_CWORD} -ge 1 && ${COMP_WORDS[1]-} == -* ]]; then
        local -a words=("${COMP_WORDS[0]}" run "${COMP_WORDS[@]:1}")
        local line="${COMP_WORDS[0]} run${COMP_LINE#*"${COMP_WORDS[0]}"}"
        local -i point=$((COMP_POINT + ${#line} - ${#COMP_LINE}))
        local -i cword=$((COMP_CWORD + 1))
        local -a COMP_WORDS=("${words[@]}")
        local COMP_LINE="${line}"
        local -i COMP_POINT=${point} COMP_CWORD=${cword}
    fi
    _sameport "$@"
}
complete -o filenames -F _sameport_default_subcommand sameport
