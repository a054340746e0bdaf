/* main.c - the rrnserve command line: one binary, a subcommand each job.
 *
 *   rrnserve info FILE            what a weight file holds
 *   rrnserve run FILE ...         run a model on text, or generate text, from the command line
 *   rrnserve serve ...            serve models over HTTP
 *   rrnserve train ...            train a model
 *   rrnserve serve [OPTIONS]      serve a folder of models over HTTP (api.md)
 *   rrnserve --version            version and compiled backends
 */
#include <stdio.h>
#include <string.h>

#include "backend.h"
#include "commands.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: rrnserve COMMAND [ARGS]\n"
            "\n"
            "commands:\n"
            "  info FILE                      print a weight file's config, tensors and checksum status\n"
            "  run FILE (--text T | --file PATH | --jsonl PATH | --generate PROMPT) [OPTIONS]\n"
            "                                 classify or score text with a model, or generate text\n"
            "                                 after a prompt, printing JSON (run --help for options)\n"
            "  serve [--models DIR] [--host ADDR] [--port N] [OPTIONS]\n"
            "                                 serve every model of DIR over HTTP (serve --help for options)\n"
            "  train --config FILE.json [--KEY VALUE ...]\n"
            "                                 train a model (train --help; docs/training.md)\n"
            "  --version                      print the version and the compiled backends\n"
            "  --help                         print this help\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--version") == 0 || strcmp(cmd, "version") == 0) {
        printf("rrnserve %s (backends: %s)\n", RRN_VERSION, backend_compiled());
        return 0;
    }
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "info") == 0)
        return cmd_info(argc - 1, argv + 1);
    if (strcmp(cmd, "run") == 0)
        return cmd_run(argc - 1, argv + 1);
    if (strcmp(cmd, "serve") == 0)
        return cmd_serve(argc - 1, argv + 1);
    if (strcmp(cmd, "train") == 0)
        return cmd_train(argc - 1, argv + 1);
    fprintf(stderr, "rrnserve: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
