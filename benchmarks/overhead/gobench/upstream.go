package main

import (
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// createdAt is a fixed stamp: the real clock would cost a formatting call per chunk and the
// benchmark measures proxies, not timestamps.
const (
	createdAt      = "2026-01-01T00:00:00Z"
	createdUnix    = 1767225600
	promptTokens   = 12
	defaultTokens  = 16
	loadDurationNs = 1_000_000
)

// chatRequest holds the only fields the upstream reads from either dialect's body.
type chatRequest struct {
	Model     string `json:"model"`
	Stream    *bool  `json:"stream"`
	MaxTokens *int   `json:"max_tokens"`
	Options   struct {
		NumPredict *int `json:"num_predict"`
	} `json:"options"`
}

func runUpstream(args []string) error {
	fs := flag.NewFlagSet("upstream", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:11434", "address to listen on")
	procs := fs.Int("gomaxprocs", 1, "GOMAXPROCS (the benchmark pins the upstream to one core)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	runtime.GOMAXPROCS(*procs)
	server := &http.Server{Addr: *listen, Handler: upstreamMux(), IdleTimeout: 5 * time.Minute}
	err := server.ListenAndServe()
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// upstreamMux answers the chat endpoints plus the discovery endpoints a proxy polls (llmtap
// detects an Ollama upstream by /api/version and lists its models from /api/tags).
func upstreamMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /api/chat", ollamaChat)
	mux.HandleFunc("POST /v1/chat/completions", openaiChat)
	mux.HandleFunc("GET /api/version", fixedJSON(`{"version":"0.0.0-gobench"}`))
	mux.HandleFunc("GET /api/tags", fixedJSON(`{"models":[{"name":"m","model":"m","size":1,`+
		`"digest":"`+strings.Repeat("0", 64)+`","details":{"family":"gobench",`+
		`"parameter_size":"1M","quantization_level":"F16"}}]}`))
	mux.HandleFunc("GET /api/ps", fixedJSON(`{"models":[]}`))
	mux.HandleFunc("GET /v1/models", fixedJSON(`{"object":"list","data":[{"id":"m",`+
		`"object":"model","created":1767225600,"owned_by":"gobench"}]}`))
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "Ollama is running")
	})
	return mux
}

func fixedJSON(body string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		_, _ = io.WriteString(w, body)
	}
}

// turn is one request's parsed parameters.
type turn struct {
	model    []byte // JSON-encoded, quotes included
	stream   bool
	tokens   int
	interval time.Duration
}

func parseTurn(r *http.Request, tokens func(*chatRequest) *int) (turn, error) {
	var body chatRequest
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		return turn{}, err
	}
	t := turn{stream: body.Stream == nil || *body.Stream, tokens: defaultTokens}
	if n := tokens(&body); n != nil && *n >= 0 {
		t.tokens = *n
	}
	name := body.Model
	if name == "" {
		name = "m"
	}
	t.model, _ = json.Marshal(name)
	if us, err := strconv.Atoi(r.Header.Get("X-Interval-Us")); err == nil && us > 0 {
		t.interval = time.Duration(us) * time.Microsecond
	}
	return t, nil
}

// pacer writes one chunk per Write+Flush, waiting the turn's interval between chunks so that
// paced chunks reach the proxy as separate reads instead of coalescing in socket buffers.
type pacer struct {
	w       http.ResponseWriter
	flusher http.Flusher
	gap     time.Duration
	sent    int
}

func (p *pacer) send(chunk []byte) error {
	if p.sent > 0 && p.gap > 0 {
		sleep(p.gap)
	}
	p.sent++
	if _, err := p.w.Write(chunk); err != nil {
		return err
	}
	p.flusher.Flush()
	return nil
}

// sleep blocks the goroutine's thread in nanosleep: Go's timers wake no sooner than about
// 1 ms on Linux (the netpoller waits in whole milliseconds), far coarser than the 200-500 µs
// intervals the benchmark asks for.
func sleep(d time.Duration) {
	ts := syscall.NsecToTimespec(int64(d))
	for syscall.Nanosleep(&ts, &ts) == syscall.EINTR {
	}
}

func ollamaChat(w http.ResponseWriter, r *http.Request) {
	t, err := parseTurn(r, func(b *chatRequest) *int { return b.Options.NumPredict })
	if err != nil {
		http.Error(w, `{"error":"invalid JSON body"}`, http.StatusBadRequest)
		return
	}
	start := time.Now()
	if !t.stream {
		writeWhole(w, "application/json; charset=utf-8", ollamaWhole(t, time.Since(start)))
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	p := &pacer{w: w, flusher: w.(http.Flusher), gap: t.interval}
	line := make([]byte, 0, 256)
	firstToken := time.Now()
	for i := 1; i <= t.tokens; i++ {
		line = ollamaLine(line[:0], t.model, i)
		if p.send(line) != nil {
			return // the client went away
		}
	}
	line = ollamaDone(line[:0], t, time.Since(start), time.Since(firstToken))
	_ = p.send(line)
}

func ollamaHead(dst, model []byte) []byte {
	dst = append(dst, `{"model":`...)
	dst = append(dst, model...)
	return append(dst, `,"created_at":"`+createdAt+`","message":{"role":"assistant","content":"`...)
}

func ollamaLine(dst, model []byte, i int) []byte {
	dst = ollamaHead(dst, model)
	dst = appendToken(dst, i)
	return append(dst, `"},"done":false}`+"\n"...)
}

func appendToken(dst []byte, i int) []byte {
	dst = append(dst, "tok"...)
	dst = strconv.AppendInt(dst, int64(i), 10)
	return append(dst, ' ')
}

// ollamaStats is the tail Ollama puts on its last object: done, the reason and its counters.
func ollamaStats(dst []byte, t turn, total, eval time.Duration) []byte {
	dst = append(dst, `"done_reason":"stop","done":true,"total_duration":`...)
	dst = strconv.AppendInt(dst, int64(total), 10)
	dst = append(dst, `,"load_duration":`...)
	dst = strconv.AppendInt(dst, loadDurationNs, 10)
	dst = append(dst, `,"prompt_eval_count":`...)
	dst = strconv.AppendInt(dst, promptTokens, 10)
	dst = append(dst, `,"prompt_eval_duration":`...)
	dst = strconv.AppendInt(dst, int64(total-eval), 10)
	dst = append(dst, `,"eval_count":`...)
	dst = strconv.AppendInt(dst, int64(t.tokens), 10)
	dst = append(dst, `,"eval_duration":`...)
	dst = strconv.AppendInt(dst, int64(eval), 10)
	return append(dst, "}\n"...)
}

func ollamaDone(dst []byte, t turn, total, eval time.Duration) []byte {
	dst = ollamaHead(dst, t.model)
	dst = append(dst, `"},`...)
	return ollamaStats(dst, t, total, eval)
}

func ollamaWhole(t turn, took time.Duration) []byte {
	dst := ollamaHead(make([]byte, 0, 256+8*t.tokens), t.model)
	for i := 1; i <= t.tokens; i++ {
		dst = appendToken(dst, i)
	}
	dst = append(dst, `"},`...)
	return ollamaStats(dst, t, took, took)
}

// writeWhole sends a non-streamed answer with Content-Length, as Ollama and llama-server do.
func writeWhole(w http.ResponseWriter, contentType string, body []byte) {
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	_, _ = w.Write(body)
}

func openaiChat(w http.ResponseWriter, r *http.Request) {
	t, err := parseTurn(r, func(b *chatRequest) *int { return b.MaxTokens })
	if err != nil {
		http.Error(w, `{"error":{"message":"invalid JSON body","type":"invalid_request_error"}}`,
			http.StatusBadRequest)
		return
	}
	if !t.stream {
		writeWhole(w, "application/json; charset=utf-8", openaiWhole(t))
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	p := &pacer{w: w, flusher: w.(http.Flusher), gap: t.interval}
	event := make([]byte, 0, 384)
	// llama-server's order: a role-only delta, one event per token, a finish event that
	// carries usage, then the [DONE] sentinel.
	event = openaiEvent(event[:0], t.model, `{"role":"assistant","content":null}`, 0, "null")
	if p.send(event) != nil {
		return
	}
	for i := 1; i <= t.tokens; i++ {
		event = openaiEvent(event[:0], t.model, "", i, "null")
		if p.send(event) != nil {
			return
		}
	}
	event = openaiFinish(event[:0], t)
	if p.send(event) != nil {
		return
	}
	_ = p.send([]byte("data: [DONE]\n\n"))
}

func openaiChunkHead(dst, model []byte) []byte {
	dst = append(dst, `data: {"id":"chatcmpl-gobench","object":"chat.completion.chunk",`+
		`"created":`...)
	dst = strconv.AppendInt(dst, createdUnix, 10)
	dst = append(dst, `,"model":`...)
	dst = append(dst, model...)
	return append(dst, `,"system_fingerprint":"gobench","choices":[{"index":0,"delta":`...)
}

// openaiEvent is one chat.completion.chunk event: delta is a literal JSON object, or, when
// empty, the content delta of token i.
func openaiEvent(dst, model []byte, delta string, i int, finish string) []byte {
	dst = openaiChunkHead(dst, model)
	if delta != "" {
		dst = append(dst, delta...)
	} else {
		dst = append(dst, `{"content":"`...)
		dst = appendToken(dst, i)
		dst = append(dst, `"}`...)
	}
	dst = append(dst, `,"logprobs":null,"finish_reason":`...)
	dst = append(dst, finish...)
	return append(dst, "}]}\n\n"...)
}

func openaiFinish(dst []byte, t turn) []byte {
	dst = openaiEvent(dst, t.model, "{}", 0, `"stop"`)
	dst = dst[:len(dst)-len("}\n\n")] // reopen the object to add usage
	dst = appendUsage(append(dst, ','), t.tokens)
	return append(dst, "}\n\n"...)
}

func appendUsage(dst []byte, tokens int) []byte {
	dst = append(dst, `"usage":{"completion_tokens":`...)
	dst = strconv.AppendInt(dst, int64(tokens), 10)
	dst = append(dst, `,"prompt_tokens":`...)
	dst = strconv.AppendInt(dst, promptTokens, 10)
	dst = append(dst, `,"total_tokens":`...)
	dst = strconv.AppendInt(dst, int64(tokens+promptTokens), 10)
	return append(dst, '}')
}

func openaiWhole(t turn) []byte {
	dst := make([]byte, 0, 384+8*t.tokens)
	dst = append(dst, `{"id":"chatcmpl-gobench","object":"chat.completion","created":`...)
	dst = strconv.AppendInt(dst, createdUnix, 10)
	dst = append(dst, `,"model":`...)
	dst = append(dst, t.model...)
	dst = append(dst, `,"system_fingerprint":"gobench","choices":[{"index":0,"message":`+
		`{"role":"assistant","content":"`...)
	for i := 1; i <= t.tokens; i++ {
		dst = appendToken(dst, i)
	}
	dst = append(dst, `"},"logprobs":null,"finish_reason":"stop"}],`...)
	dst = appendUsage(dst, t.tokens)
	return append(dst, '}')
}
