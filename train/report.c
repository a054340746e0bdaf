/* report.c - a training run's learning curve as CSV and as an SVG plot
 * (see report.h).
 *
 * Both files are written next to their final name and renamed into place,
 * so a plot a person reloads during training, or a script reading the CSV,
 * never sees half a file.
 */
#include "report.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int curve_add(struct curve *c, const struct curve_point *p)
{
    if (c->n == c->cap) {
        int want = c->cap ? c->cap * 2 : 64;
        if (c->cap > (1 << 28))
            return -1;
        struct curve_point *grown = realloc(c->p, (size_t)want * sizeof *grown);
        if (!grown)
            return -1;
        c->p = grown;
        c->cap = want;
    }
    c->p[c->n++] = *p;
    return 0;
}

void curve_free(struct curve *c)
{
    free(c->p);
    c->p = NULL;
    c->n = c->cap = 0;
}

/* ---- Writing a file whole */

struct out {
    FILE *f;
    const char *path;
    char *tmp;
};

static int out_open(struct out *o, const char *path, char *err, size_t errlen)
{
    size_t len = strlen(path) + sizeof ".tmp";

    o->path = path;
    o->f = NULL;
    o->tmp = malloc(len);
    if (!o->tmp) {
        snprintf(err, errlen, "%s: out of memory", path);
        return -1;
    }
    snprintf(o->tmp, len, "%s.tmp", path);
    o->f = fopen(o->tmp, "w");
    if (!o->f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        free(o->tmp);
        return -1;
    }
    return 0;
}

/* Close and move into place; on any error the temporary file goes. */
static int out_close(struct out *o, char *err, size_t errlen)
{
    int rc = ferror(o->f) ? (errno ? errno : EIO) : 0;
    if (fclose(o->f) != 0 && rc == 0)
        rc = errno;
    if (rc == 0 && rename(o->tmp, o->path) != 0)
        rc = errno;
    if (rc != 0) {
        snprintf(err, errlen, "%s: %s", o->path, strerror(rc));
        remove(o->tmp);
    }
    free(o->tmp);
    return rc ? -1 : 0;
}

/* ---- CSV */

/* The shortest decimal that reads back as v (0.1, not 0.10000000000000001),
 * or nothing for NAN. */
static void put_number(FILE *f, double v)
{
    char buf[40];
    int digits = 1;

    if (isnan(v))
        return;
    for (; digits < 17; digits++) {
        snprintf(buf, sizeof buf, "%.*g", digits, v);
        if (strtod(buf, NULL) == v)
            break;
    }
    /* %g turns to an exponent once the integer part has more digits than
     * the precision (13000 at 2 digits is 1.3e+04): give it those. */
    if (isfinite(v) && fabs(v) >= 1.0) {
        int whole = (int)floor(log10(fabs(v))) + 1;
        if (whole > digits && whole <= 17)
            digits = whole;
    }
    snprintf(buf, sizeof buf, "%.*g", digits, v);
    fputs(buf, f);
}

int curve_write_csv(const struct curve *c, const char *path, char *err, size_t errlen)
{
    struct out o;

    if (out_open(&o, path, err, errlen) != 0)
        return -1;
    fprintf(o.f, "step,epoch,train_loss,valid_loss,%s,lr,tokens_per_s,grad_norm\n",
            c->metric_name ? c->metric_name : "metric");
    for (int i = 0; i < c->n; i++) {
        const struct curve_point *p = &c->p[i];
        const double fields[] = {p->epoch, p->train_loss, p->valid_loss, p->valid_metric, p->lr, p->tokens_per_s,
                                 p->grad_norm};
        fprintf(o.f, "%ld", p->step);
        for (size_t k = 0; k < sizeof fields / sizeof fields[0]; k++) {
            fputc(',', o.f);
            put_number(o.f, fields[k]);
        }
        fputc('\n', o.f);
    }
    return out_close(&o, err, errlen);
}

/* ---- SVG */

enum { WIDTH = 800, HEIGHT = 480, LEFT = 72, RIGHT = 24, TOP = 44, BOTTOM = 56 };

/* A linear axis: data range [lo, hi] with ticks every `step`, mapped onto
 * pixels [from, to]. */
struct axis {
    double lo, hi, step;
    int decimals; /* for the tick labels */
    double from, to;
};

/* Round the range out to a tick step of 1, 2 or 5 times a power of ten
 * giving about six ticks, so the labels are round numbers. */
static void axis_fit(struct axis *a, double min, double max, double from, double to)
{
    if (!(min <= max)) { /* no finite data */
        min = 0.0;
        max = 1.0;
    }
    if (max - min < 1e-12 * fmax(1.0, fabs(max))) {
        double pad = fabs(max) > 0.0 ? fabs(max) * 0.1 : 1.0;
        min -= pad;
        max += pad;
    }
    double raw = (max - min) / 6.0;
    double mag = pow(10.0, floor(log10(raw)));
    double norm = raw / mag;
    a->step = (norm < 1.5 ? 1.0 : norm < 3.0 ? 2.0 : norm < 7.0 ? 5.0 : 10.0) * mag;
    a->lo = floor(min / a->step) * a->step;
    a->hi = ceil(max / a->step) * a->step;
    int d = -(int)floor(log10(a->step) + 1e-9);
    a->decimals = d > 0 ? d : 0;
    a->from = from;
    a->to = to;
}

static double axis_px(const struct axis *a, double v)
{
    return a->from + (v - a->lo) / (a->hi - a->lo) * (a->to - a->from);
}

/* Text as SVG character data or attribute value. */
static void put_escaped(FILE *f, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '&':
            fputs("&amp;", f);
            break;
        case '<':
            fputs("&lt;", f);
            break;
        case '>':
            fputs("&gt;", f);
            break;
        case '"':
            fputs("&quot;", f);
            break;
        case '\'':
            fputs("&apos;", f);
            break;
        default:
            fputc(*s, f);
        }
    }
}

static double train_of(const struct curve_point *p)
{
    return p->train_loss;
}

static double valid_of(const struct curve_point *p)
{
    return p->valid_loss;
}

struct series {
    const char *label, *color;
    double (*value)(const struct curve_point *);
};

static const struct series series[] = {
    {"training loss", "#1f77b4", train_of},
    {"validation loss", "#ff7f0e", valid_of},
};
#define N_SERIES (sizeof series / sizeof series[0])

static int series_points(const struct curve *c, const struct series *s)
{
    int n = 0;
    for (int i = 0; i < c->n; i++)
        n += isfinite(s->value(&c->p[i])) != 0;
    return n;
}

static void put_grid_and_ticks(FILE *f, const struct axis *x, const struct axis *y)
{
    fputs("<g stroke=\"#e0e0e0\" stroke-width=\"1\">\n", f);
    /* Ticks by index, not by adding step up: no drift past the last one. */
    long nx = lround((x->hi - x->lo) / x->step), ny = lround((y->hi - y->lo) / y->step);
    for (long k = 0; k <= nx; k++) {
        double px = axis_px(x, x->lo + (double)k * x->step);
        fprintf(f, "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\"/>\n", px, TOP, px, HEIGHT - BOTTOM);
    }
    for (long k = 0; k <= ny; k++) {
        double py = axis_px(y, y->lo + (double)k * y->step);
        fprintf(f, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\"/>\n", LEFT, py, WIDTH - RIGHT, py);
    }
    fputs("</g>\n", f);
    fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#333\"/>\n", LEFT, TOP,
            WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    fputs("<g fill=\"#333\">\n", f);
    for (long k = 0; k <= nx; k++) {
        double v = x->lo + (double)k * x->step;
        fprintf(f, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%.*f</text>\n", axis_px(x, v),
                HEIGHT - BOTTOM + 18, x->decimals, v);
    }
    for (long k = 0; k <= ny; k++) {
        double v = y->lo + (double)k * y->step;
        fprintf(f, "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%.*f</text>\n", LEFT - 6, axis_px(y, v) + 4,
                y->decimals, v);
    }
    fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">step</text>\n", (LEFT + WIDTH - RIGHT) / 2,
            HEIGHT - 14);
    fprintf(f, "<text transform=\"translate(18 %d) rotate(-90)\" text-anchor=\"middle\">loss</text>\n",
            (TOP + HEIGHT - BOTTOM) / 2);
    fputs("</g>\n", f);
}

/* A polyline through the series' finite points, and a dot on each when
 * they are few enough to make out (validation is measured now and then). */
static void put_series(FILE *f, const struct curve *c, const struct series *s, const struct axis *x,
                       const struct axis *y)
{
    int n = series_points(c, s);
    fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" stroke-linejoin=\"round\" points=\"",
            s->color);
    int first = 1;
    for (int i = 0; i < c->n; i++) {
        double v = s->value(&c->p[i]);
        if (!isfinite(v))
            continue;
        fprintf(f, "%s%.1f,%.1f", first ? "" : " ", axis_px(x, (double)c->p[i].step), axis_px(y, v));
        first = 0;
    }
    fputs("\"/>\n", f);
    if (n > 50)
        return;
    fprintf(f, "<g fill=\"%s\">\n", s->color);
    for (int i = 0; i < c->n; i++) {
        double v = s->value(&c->p[i]);
        if (isfinite(v))
            fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\"/>\n", axis_px(x, (double)c->p[i].step),
                    axis_px(y, v));
    }
    fputs("</g>\n", f);
}

int curve_write_svg(const struct curve *c, const char *path, const char *title, char *err, size_t errlen)
{
    double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
    for (int i = 0; i < c->n; i++) {
        xmin = fmin(xmin, (double)c->p[i].step);
        xmax = fmax(xmax, (double)c->p[i].step);
        for (size_t s = 0; s < N_SERIES; s++) {
            double v = series[s].value(&c->p[i]);
            if (isfinite(v)) {
                ymin = fmin(ymin, v);
                ymax = fmax(ymax, v);
            }
        }
    }
    struct axis x, y;
    axis_fit(&x, xmin, xmax, LEFT, WIDTH - RIGHT);
    axis_fit(&y, ymin, ymax, HEIGHT - BOTTOM, TOP); /* up is smaller y */

    struct out o;
    if (out_open(&o, path, err, errlen) != 0)
        return -1;
    FILE *f = o.f;
    fputs("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n", f);
    fprintf(f,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" viewBox=\"0 0 %d %d\" "
            "font-family=\"sans-serif\" font-size=\"12\">\n",
            WIDTH, HEIGHT, WIDTH, HEIGHT);
    fprintf(f, "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n", WIDTH, HEIGHT);
    fprintf(f, "<text x=\"%d\" y=\"28\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">", WIDTH / 2);
    put_escaped(f, title ? title : "");
    fputs("</text>\n", f);
    put_grid_and_ticks(f, &x, &y);

    int rows = 0;
    for (size_t s = 0; s < N_SERIES; s++) {
        if (series_points(c, &series[s]) > 0) {
            put_series(f, c, &series[s], &x, &y);
            rows++;
        }
    }
    /* The legend, over the curves in the plot's top right corner, on a
     * white ground that keeps it readable where a curve passes under. */
    const int lx = WIDTH - RIGHT - 150;
    if (rows > 0)
        fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"140\" height=\"%d\" fill=\"white\" fill-opacity=\"0.85\" "
                   "stroke=\"#ccc\"/>\n",
                lx - 8, TOP + 6, 18 * rows + 6);
    int row = 0;
    for (size_t s = 0; s < N_SERIES; s++) {
        if (series_points(c, &series[s]) == 0)
            continue;
        int ly = TOP + 22 + 18 * row++;
        fprintf(f,
                "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\" stroke-width=\"2\"/>"
                "<text x=\"%d\" y=\"%d\" fill=\"#333\">%s</text>\n",
                lx, ly - 4, lx + 24, ly - 4, series[s].color, lx + 30, ly, series[s].label);
    }
    fputs("</svg>\n", f);
    return out_close(&o, err, errlen);
}
