// Command kstatus prints what sigs.k8s.io/cli-utils' kstatus (the library Flux and kpt
// use for health) computes for Kubernetes objects, so tests can check beekeeper's status
// against the real computation instead of a reading of its rules.
//
// Input on stdin: one object or a List (kubectl get -o json), as JSON.
// Output on stdout: one JSON line per object: {"kind", "namespace", "name", "status", "message"}.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name"`
	Status    string `json:"status"`
	Message   string `json:"message"`
}

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("reading stdin: %v", err)
	}
	// The unstructured decoders keep integers as int64, which kstatus' accessors require.
	var items []unstructured.Unstructured
	list := &unstructured.UnstructuredList{}
	if err := list.UnmarshalJSON(data); err == nil {
		items = list.Items
	} else {
		one := unstructured.Unstructured{}
		if err := one.UnmarshalJSON(data); err != nil {
			fail("stdin is neither a Kubernetes object nor a List: %v", err)
		}
		items = []unstructured.Unstructured{one}
	}
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	encoder := json.NewEncoder(out)
	for i := range items {
		item := &items[i]
		result, err := status.Compute(item)
		if err != nil {
			fail("%s %s: %v", item.GetKind(), item.GetName(), err)
		}
		line := verdict{item.GetKind(), item.GetNamespace(), item.GetName(), string(result.Status), result.Message}
		if err := encoder.Encode(line); err != nil {
			fail("writing stdout: %v", err)
		}
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "kstatus: "+format+"\n", args...)
	os.Exit(1)
}
