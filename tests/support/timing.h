/* timing.h - sleeping and a monotonic clock for the tests' bounded waits.
 *
 * Every wait in the tests is a poll with a bound, never a bare sleep that
 * hopes something happened: these are the two pieces such loops need. */
#ifndef RRN_TEST_TIMING_H
#define RRN_TEST_TIMING_H

void sleep_ms(int ms);
/* Seconds on CLOCK_MONOTONIC: differences only, unaffected by clock changes. */
double now_s(void);

#endif
