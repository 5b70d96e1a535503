# fish completion for containerflip(1)
# Install: copy to /usr/share/fish/vendor_completions.d/containerflip.fish

set -l commands run deploy rollback status stop
complete -c containerflip -f
complete -c containerflip -n "not __fish_seen_subcommand_from $commands" -a run -d 'Own the sockets and supervise worker generations'
complete -c containerflip -n "not __fish_seen_subcommand_from $commands" -a deploy -d 'Start a new generation and wait for the outcome'
complete -c containerflip -n "not __fish_seen_subcommand_from $commands" -a rollback -d 'Deploy the previous command'
complete -c containerflip -n "not __fish_seen_subcommand_from $commands" -a status -d 'Show generations, listeners and counters'
complete -c containerflip -n "not __fish_seen_subcommand_from $commands" -a stop -d 'Stop the supervisor gracefully'
complete -c containerflip -n "not __fish_seen_subcommand_from $commands" -s h -l help -d 'Print help'
complete -c containerflip -n "not __fish_seen_subcommand_from $commands" -s V -l version -d 'Print the version'

complete -c containerflip -n "__fish_seen_subcommand_from run" -s l -l listen -x -d 'Socket to own: [NAME=]ADDR'
complete -c containerflip -n "__fish_seen_subcommand_from run" -l backlog -x -d 'listen(2) backlog'
complete -c containerflip -n "__fish_seen_subcommand_from run" -l notify-mode -x -a 'dgram stream' -d 'NOTIFY_SOCKET type'
complete -c containerflip -n "__fish_seen_subcommand_from run" -l ready-timeout -x -d 'Readiness deadline (DUR)'
complete -c containerflip -n "__fish_seen_subcommand_from run" -l drain-timeout -x -d 'Drain deadline (DUR)'
complete -c containerflip -n "__fish_seen_subcommand_from run" -l stop-signal -x -a 'TERM INT QUIT HUP USR1 USR2' -d 'Signal that asks a generation to drain'
complete -c containerflip -n "__fish_seen_subcommand_from run" -l on-crash -x -a 'restart exit' -d 'When the active generation dies'
complete -c containerflip -n "__fish_seen_subcommand_from run" -l pidfile -r -F -d 'Write the pid here'
complete -c containerflip -n "__fish_seen_subcommand_from run" -s C -l chdir -x -a '(__fish_complete_directories)' -d 'Working directory of workers'
complete -c containerflip -n "__fish_seen_subcommand_from run" -l env-file -r -F -d 'KEY=VALUE file read at every spawn'
complete -c containerflip -n "__fish_seen_subcommand_from run" -s q -l quiet -d 'Log less'
complete -c containerflip -n "__fish_seen_subcommand_from run" -s v -l verbose -d 'Log more'
complete -c containerflip -n "__fish_seen_subcommand_from $commands" -l control -r -F -d 'Control socket'
complete -c containerflip -n "__fish_seen_subcommand_from deploy" -l timeout -x -d 'Stop waiting after DUR'
complete -c containerflip -n "__fish_seen_subcommand_from status" -l json -d 'Print one JSON object'
complete -c containerflip -n "__fish_seen_subcommand_from status" -l check -d 'Exit 0 if a ready generation serves'
complete -c containerflip -n "__fish_seen_subcommand_from $commands" -s h -l help -d 'Print help'
