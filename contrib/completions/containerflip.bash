# bash completion for containerflip(1)
# Install: copy to /usr/share/bash-completion/completions/containerflip
_containerflip() {
    local cur prev cmd i
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD-1]}
    cmd=
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            --) return 0 ;;  # the worker command: the shell's default completion
            run|deploy|rollback|status|stop) [[ -z $cmd ]] && cmd=${COMP_WORDS[i]} ;;
        esac
    done
    case $prev in
        --notify-mode) COMPREPLY=($(compgen -W "dgram stream" -- "$cur")); return ;;
        --on-crash) COMPREPLY=($(compgen -W "restart exit" -- "$cur")); return ;;
        --stop-signal) COMPREPLY=($(compgen -W "TERM INT QUIT HUP USR1 USR2" -- "$cur")); return ;;
        --control|--pidfile|--env-file) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        -C|--chdir) COMPREPLY=($(compgen -d -- "$cur")); return ;;
        -l|--listen|--backlog|--ready-timeout|--drain-timeout|--timeout) return ;;
    esac
    local opts
    case $cmd in
        run) opts="--listen --backlog --notify-mode --ready-timeout --drain-timeout --stop-signal --on-crash --control --pidfile --chdir --env-file --quiet --verbose --help" ;;
        deploy) opts="--control --timeout --help" ;;
        status) opts="--control --json --check --help" ;;
        rollback|stop) opts="--control --help" ;;
        *) opts="run deploy rollback status stop --help --version" ;;
    esac
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
}
complete -o bashdefault -o default -F _containerflip containerflip
