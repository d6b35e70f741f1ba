// Command gobench is the CPU benchmark's independent side: a fast upstream that speaks
// Ollama's and OpenAI's wire formats, and a closed-loop load generator. Neither shares code
// with llmtap, so the proxy under test is the only variable.
//
//	gobench upstream --listen 127.0.0.1:PORT [--gomaxprocs 1]
//	gobench load --url http://127.0.0.1:PORT --dialect ollama|openai --connections C \
//	    --duration S --tokens N [--path P] [--no-stream] [--interval-us U] [--warmup S]
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: gobench upstream|load [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "upstream":
		err = runUpstream(os.Args[2:])
	case "load":
		err = runLoad(os.Args[2:])
	default:
		err = fmt.Errorf("unknown mode %q: want upstream or load", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gobench:", err)
		os.Exit(1)
	}
}
