/* config.h - a model's architecture, as stored in a weight file's metadata.
 *
 * The "config" metadata string of a weight file (../shared/MODELS.md) is a
 * JSON object; this module turns it into a plain struct the engine can use
 * without touching JSON again, and back into JSON for writing files and for
 * reporting.  Absent options take the defaults that make the model a plain
 * PyTorch one (no peephole, no skip, no residual, no attention).
 */
#ifndef RRN_CONFIG_H
#define RRN_CONFIG_H

#include <stddef.h>

/* Limits that keep a hostile config from asking for absurd allocations.
 * They are far above anything the papers use. */
#define CONFIG_MAX_HIDDEN 16384
#define CONFIG_MAX_LAYERS 64
#define CONFIG_MAX_EMBED 16384
#define CONFIG_MAX_VOCAB 1000000
#define CONFIG_MAX_CLASSES 65536
#define CONFIG_MAX_SKIP_PERIOD 1024
#define CONFIG_MAX_SKIP_MATRICES 64
#define CONFIG_MAX_ATTN_WINDOW 256

enum task { TASK_CLASSIFY, TASK_LM, TASK_REGRESS };
enum cell { CELL_RNN_TANH, CELL_RNN_RELU, CELL_LSTM, CELL_GRU };
enum pool { POOL_LAST, POOL_MEAN };
enum attn_mode { ATTN_NONE, ATTN_STATIC, ATTN_DYNAMIC };
enum tokenizer_type { TOKENIZER_BYTE, TOKENIZER_CHAR, TOKENIZER_WORD };

struct model_config {
    enum task task;
    enum cell cell;
    int hidden;        /* H */
    int layers;        /* L */
    int bidirectional; /* 0 or 1 */
    int embed_dim;     /* E */
    int peephole;      /* lstm only */
    int skip_period;   /* K >= 1; 1 means no temporal skip */
    int skip_matrices; /* M >= 1 */
    int residual_depth;/* RRN: y^l = h^l + P_l y^{l-2} for l >= 2 */
    enum attn_mode attn_mode;
    int attn_window;   /* RRA window K; 0 when attn_mode is ATTN_NONE */
    enum pool pool;    /* classify only */
    int n_classes;
    char **classes;    /* n_classes label strings (classify) */
    int n_outputs;     /* regress: width of the prediction */
    int input_dim;     /* vector inputs (no tokenizer, no embedding): their
                          width, which is embed_dim; 0 for token inputs */
    enum tokenizer_type tok_type;
    int n_tokens;      /* char/word: length of tokens[]; byte: 0 */
    char **tokens;     /* char/word: one UTF-8 string per id */
    int unk;           /* char/word: id of unknown tokens */
};

/* Parse a config JSON object.  On failure returns -1 and writes a message
 * naming the offending field into err. */
int config_parse(const char *json, struct model_config *cfg, char *err, size_t errlen);
/* 0 when every key of the JSON object obj is one of allowed[] (at most 32),
 * each at most once; else -1 with the key named in err, after prefix (the
 * enclosing object's path and a dot, "" at the top).  cJSON keeps
 * duplicate keys as separate members, and which one a lookup returns is an
 * accident of its implementation (most other readers take the last), so a
 * duplicate is refused outright.  The trainer's options check theirs too. */
struct cJSON;
int config_check_keys(const struct cJSON *obj, const char *prefix, const char *const *allowed, int n_allowed,
                      char *err, size_t errlen);

/* The inverse of config_parse: a freshly malloc'd JSON string, or NULL. */
char *config_to_json(const struct model_config *cfg);
/* The same, indented for people to read (rrnserve info). */
char *config_to_json_pretty(const struct model_config *cfg);

void config_free(struct model_config *cfg);

/* Derived sizes, so no caller has to know the rules twice.  A model with
 * vector inputs has no vocabulary (config_vocab is 0). */
int config_gates(const struct model_config *cfg);      /* G: 1, 4 or 3 */
int cell_gates(enum cell c);                           /* the same, for a cell */
int config_directions(const struct model_config *cfg); /* 1 or 2 */
int config_vocab(const struct model_config *cfg);      /* V */
int config_layer_input(const struct model_config *cfg, int layer); /* width fed to layer k (0-based) */
int config_output_width(const struct model_config *cfg); /* H * directions */
int config_head_out(const struct model_config *cfg);    /* C or V */

const char *cell_name(enum cell c);
const char *task_name(enum task t);

#endif
