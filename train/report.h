/* report.h - the learning curve of a training run, as the CSV a script can
 * read and the SVG plot a person can look at.
 */
#ifndef RRN_REPORT_H
#define RRN_REPORT_H

#include <stdio.h>

struct curve_point {
    long step;
    double epoch;        /* fractional */
    double train_loss;   /* mean over the steps since the last point */
    double valid_loss;   /* NAN when not measured at this point */
    double valid_metric; /* accuracy or bits per character; NAN when none */
    double lr;
    double tokens_per_s;
    double grad_norm;    /* mean over the steps since the last point of the
                            gradients' L2 norm before clipping; NAN if none */
};

struct curve {
    struct curve_point *p;
    int n, cap;
    const char *metric_name; /* "accuracy", "bpc", ... or NULL */
};

int curve_add(struct curve *c, const struct curve_point *p);
void curve_free(struct curve *c);

/* CSV with a header line: step,epoch,train_loss,valid_loss,<metric>,lr,tokens_per_s,grad_norm
 * (empty fields where NAN). */
int curve_write_csv(const struct curve *c, const char *path, char *err, size_t errlen);

/* A standalone SVG: training and validation loss against step, axes with
 * ticks and labels, a legend, the title given.  Readable in a browser. */
int curve_write_svg(const struct curve *c, const char *path, const char *title, char *err, size_t errlen);

#endif
