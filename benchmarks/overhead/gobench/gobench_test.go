package main

import (
	"net/http/httptest"
	"testing"
	"time"
)

// TestLoadAgainstUpstream drives the upstream with the load generator in every dialect and
// mode: no errors, and every finished answer's chunks counted.
func TestLoadAgainstUpstream(t *testing.T) {
	server := httptest.NewServer(upstreamMux())
	defer server.Close()
	for _, tc := range []struct {
		dialect  string
		stream   bool
		interval int
	}{
		{"ollama", true, 0}, {"ollama", false, 0}, {"openai", true, 0}, {"openai", false, 0},
		{"ollama", true, 200},
	} {
		cfg := loadConfig{url: server.URL, path: defaultPaths[tc.dialect], dialect: tc.dialect,
			model: "m", connections: 2, tokens: 5, intervalUs: tc.interval, stream: tc.stream,
			duration: 200 * time.Millisecond}
		res, err := measure(cfg)
		if err != nil {
			t.Fatal(err)
		}
		perAnswer := int64(cfg.tokens)
		if !tc.stream {
			perAnswer = 1
		}
		// No warm-up: the window opens before the first request, so every completed answer's
		// chunks are in it, plus those of answers still running when it closed.
		low, high := res.Requests*perAnswer, (res.Requests+int64(cfg.connections))*perAnswer
		if res.Errors != 0 || res.Requests == 0 || res.Chunks < low || res.Chunks > high {
			t.Errorf("%+v: %+v", tc, res)
		}
		// Paced: every answer sleeps `tokens` intervals (before each chunk after the first and
		// before the final line), a lower bound whatever the machine's load.
		if tc.interval > 0 {
			pause := time.Duration(cfg.tokens*tc.interval) * time.Microsecond
			most := int64(cfg.connections) * int64(cfg.duration/pause+1)
			if res.Requests > most {
				t.Errorf("%+v: %d answers in %v, at most %d when paced", tc, res.Requests,
					cfg.duration, most)
			}
		}
	}
}

func TestHasContent(t *testing.T) {
	for frame, want := range map[string]bool{
		`{"message":{"content":"tok1 "}}`:  true,
		`{"message":{"content": "x"}}`:     true,
		`{"message":{"content":""}}`:       false,
		`{"delta":{"content":null}}`:       false,
		`{"delta":{},"finish_reason":"x"}`: false,
	} {
		if got := hasContent([]byte(frame)); got != want {
			t.Errorf("hasContent(%s) = %v", frame, got)
		}
	}
}
