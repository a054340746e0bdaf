/* page.h - the HTML page served at GET /: a heatmap of the attention
 * weights /attention gives for a typed text (page.c).
 */
#ifndef RRN_PAGE_H
#define RRN_PAGE_H

/* The whole page, a static NUL-terminated UTF-8 string. */
const char *page_index(void);

#endif
