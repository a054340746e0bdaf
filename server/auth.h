/* auth.h - API keys: `--api-keys FILE` holds one hex SHA-256 hash of a key
 * per line ('#' starts a comment, blank lines are skipped), so the file
 * never holds a key itself.  A request is let in when the SHA-256 of the
 * key in its `Authorization: Bearer KEY` header matches one of them.  The
 * file can be read again while requests are checked (SIGHUP), so keys
 * are added and revoked without a restart.
 */
#ifndef RRN_AUTH_H
#define RRN_AUTH_H

#include <stddef.h>

struct auth;

/* NULL with a message (naming the line) in err when the file cannot be
 * read, a line is not a 64-digit hex hash, or there is no hash at all. */
struct auth *auth_load(const char *path, char *err, size_t errlen);
/* Replaces the keys with those of the file at path: their number (0, a
 * file of no hash, revokes every key), or -1 with a message in err (as
 * auth_load's) and the keys left as they were. */
int auth_reload(struct auth *a, const char *path, char *err, size_t errlen);
void auth_free(struct auth *a);

int auth_count(struct auth *a);

/* 1 when the Authorization header value (may be NULL) carries a known key.
 * The hash is compared in constant time against every entry, so neither
 * the timing nor the position of a match tells anything about the keys. */
int auth_check(struct auth *a, const char *authorization);

#endif
