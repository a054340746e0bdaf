/* files.h - files and folders of the tests: a group's scratch folder,
 * whole files read, written and copied, and folders removed.
 *
 * Every test folder lives under /tmp/rrn_; remove_tree refuses anything
 * else, so that a test with a bad path cannot delete a real folder. */
#ifndef RRN_TEST_FILES_H
#define RRN_TEST_FILES_H

#include <stddef.h>

/* The scratch folder, /tmp/rrn_test_XXXXXX, that scratch_setup makes and
 * scratch_teardown removes with all in it.  A global because cmocka's
 * group fixtures take no arguments and the tests' helpers need the folder
 * without a state to carry it. */
extern char scratch_dir[64];
int scratch_setup(void **state);
int scratch_teardown(void **state);
/* scratch_dir/name. */
void scratch_path(char path[512], const char *name);

/* Removes the folder dir: everything in it, or only the files named in
 * only (NULL-terminated) when only is not NULL, so that the folder itself
 * cannot be removed if anything else was left in it (tests that must
 * write nothing else rely on that).  0, or -1. */
int remove_tree(const char *dir, const char *const *only);

/* The whole of a file, NUL-terminated (also when binary) and to be freed;
 * its length in *len when len is not NULL.  NULL when it cannot be
 * opened. */
void *file_read(const char *path, size_t *len);
/* file_read of a file that must be there: fails the test otherwise. */
void *file_must_read(const char *path, size_t *len);
void file_write(const char *path, const void *data, size_t len);
void file_write_text(const char *path, const char *text);
void file_copy(const char *from, const char *to);

#endif
