// Command promlint checks a Prometheus text exposition read from stdin with the linter
// `promtool check metrics` runs (client_golang's testutil/promlint), without building all
// of Prometheus: one problem per line on stdout as "metric: text", exit 3 when there is
// any, exit 1 when the input does not parse.
package main

import (
	"fmt"
	"os"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
)

func main() {
	problems, err := promlint.New(os.Stdin).Lint()
	if err != nil {
		fmt.Fprintln(os.Stderr, "promlint: cannot parse the exposition:", err)
		os.Exit(1)
	}
	for _, p := range problems {
		fmt.Printf("%s: %s\n", p.Metric, p.Text)
	}
	if len(problems) > 0 {
		os.Exit(3)
	}
}
