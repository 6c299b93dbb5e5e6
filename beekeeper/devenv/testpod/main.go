// Command testpod is the one static binary of the real-node rig's images.
//
//	testpod pause                           the CRI sandbox process: wait for a signal
//	testpod serve PORT...                   answer every TCP connection with the pod name
//	testpod probe ADDR TIMEOUT_MS           one connection: "ok NAME" (exit 0) or "fail WHY" (exit 1)
//	testpod probe-loop ADDR EVERY_MS TIMEOUT_MS   a probe every EVERY_MS, one line each, forever
//
// Only the standard library, built with CGO_ENABLED=0, so the image needs no libc.
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	switch args := os.Args[2:]; os.Args[1] {
	case "pause":
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
	case "serve":
		serve(args)
	case "probe":
		if len(args) != 2 {
			usage()
		}
		line, ok := probe(args[0], millis(args[1]))
		fmt.Println(line)
		if !ok {
			os.Exit(1)
		}
	case "probe-loop":
		if len(args) != 3 {
			usage()
		}
		every, timeout := millis(args[1]), millis(args[2])
		out := bufio.NewWriter(os.Stdout)
		for {
			started := time.Now()
			line, _ := probe(args[0], timeout)
			fmt.Fprintf(out, "%d %s\n", started.UnixMilli(), line)
			out.Flush()
			time.Sleep(time.Until(started.Add(every)))
		}
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: testpod pause | serve PORT... | probe ADDR TIMEOUT_MS | probe-loop ADDR EVERY_MS TIMEOUT_MS")
	os.Exit(2)
}

func millis(arg string) time.Duration {
	n, err := strconv.Atoi(arg)
	if err != nil || n <= 0 {
		fmt.Fprintf(os.Stderr, "testpod: %q is not a positive number of milliseconds\n", arg)
		os.Exit(2)
	}
	return time.Duration(n) * time.Millisecond
}

func serve(ports []string) {
	if len(ports) == 0 {
		usage()
	}
	name := os.Getenv("POD_NAME")
	if name == "" {
		name, _ = os.Hostname()
	}
	for _, port := range ports {
		ln, err := net.Listen("tcp", ":"+port)
		if err != nil {
			fmt.Fprintf(os.Stderr, "testpod: listen on %s: %v\n", port, err)
			os.Exit(1)
		}
		go func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					continue
				}
				conn.SetDeadline(time.Now().Add(time.Second))
				conn.Write([]byte(name + "\n"))
				conn.Close()
			}
		}()
	}
	fmt.Println("serving on", strings.Join(ports, " "))
	select {}
}

// probe says whether a TCP connection is allowed: "ok NAME" with the server's first line,
// "ok -" when the server sends nothing (e.g. TLS), "fail WHY" when the connection fails.
func probe(addr string, timeout time.Duration) (string, bool) {
	started := time.Now()
	conn, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return "fail " + reason(err), false
	}
	defer conn.Close()
	conn.SetDeadline(started.Add(timeout))
	reply, _ := bufio.NewReader(conn).ReadString('\n')
	if reply = strings.TrimSpace(reply); reply == "" {
		reply = "-"
	}
	return "ok " + reply, true
}

func reason(err error) string {
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return "timeout"
	}
	return strings.ReplaceAll(err.Error(), " ", "_")
}
