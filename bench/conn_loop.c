// SPDX-License-Identifier: Apache-2.0
/*
 * The two ends of bench/datapath.py's connection loop, in C so that the loop costs a few
 * microseconds per connection and the datapath's share of it shows (a Python client and
 * server spend ~50 us per connection of their own, hiding differences of a few us).
 *
 *   conn_loop serve PORT           accept and close, forever (one thread)
 *   conn_loop connect IP PORT N    N connect/close (SO_LINGER 0: an RST, no TIME_WAIT);
 *                                  prints {"rate", "p50", "p99", "failed"} (conn/s, us)
 *
 * bench/datapath.py builds it with gcc into its temporary directory.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int serve(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(fd, 4096) < 0) {
        perror("listen");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int conn = accept(fd, NULL, NULL);
        if (conn >= 0)
            close(conn);
    }
}

static int connect_loop(const char *ip, int port, int n)
{
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    struct linger linger = {.l_onoff = 1, .l_linger = 0};
    struct timeval timeout = {.tv_sec = 2};
    double *latencies = calloc(n + 1, sizeof(double));
    int ok = 0, failed = 0;
    if (!latencies || inet_pton(AF_INET, ip, &addr.sin_addr) != 1)
        return 2;
    double started = now();
    for (int i = 0; i < n; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, sizeof(linger));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
        double t = now();
        if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0)
            latencies[ok++] = now() - t;
        else
            failed++;
        close(fd);
    }
    double elapsed = now() - started;
    qsort(latencies, ok, sizeof(double), by_value);
    printf("{\"rate\": %f, \"p50\": %f, \"p99\": %f, \"failed\": %d}\n", ok / elapsed, latencies[ok / 2] * 1e6,
           latencies[(int)(ok * 0.99)] * 1e6, failed);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && argv[1][0] == 's')
        return serve(atoi(argv[2]));
    if (argc == 5 && argv[1][0] == 'c')
        return connect_loop(argv[2], atoi(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: %s serve PORT | connect IP PORT N\n", argv[0]);
    return 2;
}
