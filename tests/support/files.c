/* files.c - the files and folders of files.h. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "files.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "buf.h"

char scratch_dir[64];

int scratch_setup(void **state)
{
    (void)state;
    snprintf(scratch_dir, sizeof scratch_dir, "/tmp/rrn_test_XXXXXX");
    return mkdtemp(scratch_dir) ? 0 : -1;
}

int scratch_teardown(void **state)
{
    (void)state;
    return remove_tree(scratch_dir, NULL);
}

void scratch_path(char path[512], const char *name)
{
    assert_true(snprintf(path, 512, "%s/%s", scratch_dir, name) < 512);
}

/* Removes path and, when it is a folder, all below it; 0, or -1. */
static int remove_all(const char *path)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return -1;
    if (!S_ISDIR(st.st_mode))
        return unlink(path);
    DIR *d = opendir(path);
    if (!d)
        return -1;
    int rc = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        struct buf sub = {0};
        buf_printf(&sub, "%s/%s", path, e->d_name);
        if (remove_all(sub.p) != 0)
            rc = -1;
        free(sub.p);
    }
    closedir(d);
    return rmdir(path) == 0 ? rc : -1;
}

int remove_tree(const char *dir, const char *const *only)
{
    if (strncmp(dir, "/tmp/rrn_", 9) != 0 || strstr(dir, "/.."))
        return -1;
    if (!only)
        return remove_all(dir);
    for (size_t i = 0; only[i]; i++) {
        struct buf path = {0};
        buf_printf(&path, "%s/%s", dir, only[i]);
        unlink(path.p);
        free(path.p);
    }
    return rmdir(dir);
}

void *file_read(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    struct buf b = {0};
    int failed = buf_read(&b, f);
    fclose(f);
    if (failed) {
        free(b.p);
        fail_msg("cannot read %s", path);
    }
    /* Exactly len + 1 bytes, so that under ASan a test that reads past
     * the end of what it read is caught. */
    char *exact = realloc(b.p, b.len + 1);
    if (!exact) {
        free(b.p);
        fail_msg("out of memory reading %s", path);
    }
    if (len)
        *len = b.len;
    return exact;
}

void *file_must_read(const char *path, size_t *len)
{
    void *p = file_read(path, len);
    if (!p)
        fail_msg("cannot open %s", path);
    return p;
}

void file_write(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        fail_msg("cannot write %s", path);
    assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

void file_write_text(const char *path, const char *text)
{
    file_write(path, text, strlen(text));
}

void file_copy(const char *from, const char *to)
{
    size_t len;
    char *data = file_must_read(from, &len);
    FILE *f = fopen(to, "wb");
    if (!f) {
        free(data);
        fail_msg("cannot write %s", to);
    }
    size_t wrote = fwrite(data, 1, len, f);
    free(data);
    assert_int_equal(wrote, len);
    assert_int_equal(fclose(f), 0);
}
