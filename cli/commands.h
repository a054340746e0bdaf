/* commands.h - the subcommands of the rrnserve binary; each takes the
 * arguments after "rrnserve" (argv[0] is the subcommand's name) and returns
 * the process exit status. */
#ifndef RRN_COMMANDS_H
#define RRN_COMMANDS_H

#define RRN_VERSION "0.1.0"

int cmd_info(int argc, char **argv);
int cmd_run(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_serve(int argc, char **argv);

#endif
