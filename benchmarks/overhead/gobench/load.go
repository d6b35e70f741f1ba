package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"time"
)

var defaultPaths = map[string]string{"ollama": "/api/chat", "openai": "/v1/chat/completions"}

type loadConfig struct {
	url, path, dialect, model string
	connections, tokens       int
	intervalUs                int
	stream                    bool
	duration, warmup          time.Duration
	markers                   io.Writer // window-start / window-end lines; nil: none
}

// result is what `gobench load` prints: counts are of the measured window only.
type result struct {
	Dialect      string  `json:"dialect"`
	Stream       bool    `json:"stream"`
	Tokens       int     `json:"tokens"`
	Connections  int     `json:"connections"`
	IntervalUs   int     `json:"interval_us"`
	Requests     int64   `json:"requests"`
	Errors       int64   `json:"errors"`
	Chunks       int64   `json:"chunks"`
	Reads        int64   `json:"reads"`
	Bytes        int64   `json:"bytes"`
	Elapsed      float64 `json:"elapsed"`
	RequestsPerS float64 `json:"requests_per_s"`
	ChunksPerS   float64 `json:"chunks_per_s"`
	TTFTP50      float64 `json:"ttft_p50"`
	TTFTP99      float64 `json:"ttft_p99"`
	GapMean      float64 `json:"gap_mean"`
}

func runLoad(args []string) error {
	cfg, err := parseLoadFlags(args)
	if err != nil {
		return err
	}
	res, err := measure(cfg)
	if err != nil {
		return err
	}
	out, err := json.Marshal(res)
	if err != nil {
		return err
	}
	_, err = fmt.Println(string(out))
	return err
}

func parseLoadFlags(args []string) (loadConfig, error) {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	url := fs.String("url", "", "base URL of the server or proxy (required)")
	path := fs.String("path", "", "request path (default: the dialect's chat path)")
	dialect := fs.String("dialect", "ollama", "ollama (NDJSON) or openai (SSE)")
	model := fs.String("model", "m", "model name sent in each request")
	conns := fs.Int("connections", 8, "keep-alive connections, each sending back to back")
	seconds := fs.Float64("duration", 5, "seconds measured, after the warm-up")
	warmup := fs.Float64("warmup", 1, "seconds of unmeasured load first")
	tokens := fs.Int("tokens", 10, "tokens per answer (num_predict / max_tokens)")
	noStream := fs.Bool("no-stream", false, "ask for whole answers instead of streams")
	interval := fs.Int("interval-us", 0, "upstream pause between chunks, µs (X-Interval-Us)")
	procs := fs.Int("gomaxprocs", 1, "GOMAXPROCS (the benchmark pins the client to one core)")
	markers := fs.Bool("markers", false, "print window-start / window-end lines to stderr")
	if err := fs.Parse(args); err != nil {
		return loadConfig{}, err
	}
	if *url == "" {
		return loadConfig{}, errors.New("--url is required")
	}
	if _, ok := defaultPaths[*dialect]; !ok {
		return loadConfig{}, fmt.Errorf("--dialect %q: want ollama or openai", *dialect)
	}
	if *conns < 1 || *seconds <= 0 {
		return loadConfig{}, errors.New("--connections and --duration must be positive")
	}
	runtime.GOMAXPROCS(*procs)
	cfg := loadConfig{url: *url, path: *path, dialect: *dialect, model: *model,
		connections: *conns, tokens: *tokens, intervalUs: *interval, stream: !*noStream,
		duration: seconds2d(*seconds), warmup: seconds2d(*warmup)}
	if cfg.path == "" {
		cfg.path = defaultPaths[cfg.dialect]
	}
	if *markers {
		cfg.markers = os.Stderr
	}
	return cfg, nil
}

func seconds2d(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

// window is the measured span: a request counts if it completes inside it, a chunk if it
// arrives inside it, so the figures are steady-state rates however long one request takes.
type window struct{ start, end time.Time }

func (w window) holds(t time.Time) bool { return !t.Before(w.start) && t.Before(w.end) }

func measure(cfg loadConfig) (result, error) {
	body, err := requestBody(cfg)
	if err != nil {
		return result{}, err
	}
	transport := &http.Transport{
		Proxy:               nil, // never an HTTP(S)_PROXY from the environment
		MaxConnsPerHost:     cfg.connections,
		MaxIdleConnsPerHost: cfg.connections,
		DisableCompression:  true,
		IdleConnTimeout:     time.Minute,
	}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, Timeout: 2 * time.Minute}
	t0 := time.Now()
	win := window{start: t0.Add(cfg.warmup), end: t0.Add(cfg.warmup + cfg.duration)}
	go announce(cfg.markers, win)

	workers := make([]*worker, cfg.connections)
	var wg sync.WaitGroup
	for i := range workers {
		workers[i] = newWorker(cfg, client, body)
		wg.Add(1)
		go func(w *worker) {
			defer wg.Done()
			w.run(win)
		}(workers[i])
	}
	wg.Wait()
	return summarise(cfg, win, workers), nil
}

// announce tells the orchestrator when to read the proxy's CPU counters.
func announce(out io.Writer, win window) {
	if out == nil {
		return
	}
	time.Sleep(time.Until(win.start))
	_, _ = io.WriteString(out, "window-start\n")
	time.Sleep(time.Until(win.end))
	_, _ = io.WriteString(out, "window-end\n")
}

func requestBody(cfg loadConfig) ([]byte, error) {
	body := map[string]any{
		"model":    cfg.model,
		"messages": []map[string]string{{"role": "user", "content": "why is the sky blue?"}},
		"stream":   cfg.stream,
	}
	if cfg.dialect == "ollama" {
		body["options"] = map[string]int{"num_predict": cfg.tokens}
	} else {
		body["max_tokens"] = cfg.tokens
	}
	return json.Marshal(body)
}

// tally is one worker's counts inside the window; merged once at the end, so no locking.
type tally struct {
	requests, errors, chunks, reads, bytes int64
	ttft                                   []float64
	gapSum                                 float64
	gaps                                   int64
}

type worker struct {
	cfg    loadConfig
	client *http.Client
	url    string
	body   []byte
	reader *bufio.Reader
	whole  bytes.Buffer
	tally
}

func newWorker(cfg loadConfig, client *http.Client, body []byte) *worker {
	return &worker{cfg: cfg, client: client, url: cfg.url + cfg.path, body: body,
		reader: bufio.NewReaderSize(nil, 64<<10)}
}

func (w *worker) run(win window) {
	for time.Now().Before(win.end) {
		w.once(win)
	}
}

// stamped counts the body's reads and remembers when the latest one returned: every line
// parsed from the buffer after that read arrived with it.
type stamped struct {
	body  io.Reader
	last  time.Time
	win   window
	reads *int64
	bytes *int64
}

func (s *stamped) Read(p []byte) (int, error) {
	n, err := s.body.Read(p)
	if n > 0 {
		s.last = time.Now()
		if s.win.holds(s.last) {
			*s.reads++
			*s.bytes += int64(n)
		}
	}
	return n, err
}

func (w *worker) once(win window) {
	req, err := http.NewRequest(http.MethodPost, w.url, bytes.NewReader(w.body))
	if err != nil {
		panic(err) // the URL was accepted at start-up: this cannot happen
	}
	req.Header.Set("Content-Type", "application/json")
	if w.cfg.intervalUs > 0 {
		req.Header.Set("X-Interval-Us", strconv.Itoa(w.cfg.intervalUs))
	}
	start := time.Now()
	resp, err := w.client.Do(req)
	if err != nil {
		w.finish(win, time.Now(), false)
		time.Sleep(time.Millisecond) // a refused connection must not become a busy loop
		return
	}
	body := &stamped{body: resp.Body, win: win, reads: &w.reads, bytes: &w.bytes}
	ok := resp.StatusCode == http.StatusOK
	if ok {
		ok = w.consume(body, start, win)
	}
	_, _ = io.Copy(io.Discard, body) // read to the end, so the connection is reused
	_ = resp.Body.Close()
	w.finish(win, time.Now(), ok)
}

func (w *worker) finish(win window, at time.Time, ok bool) {
	if !win.holds(at) {
		return
	}
	w.requests++
	if !ok {
		w.errors++
	}
}

// consume reads one answer, counting its content chunks, and says whether it was well formed.
func (w *worker) consume(body *stamped, start time.Time, win window) bool {
	if !w.cfg.stream {
		return w.consumeWhole(body, start, win)
	}
	w.reader.Reset(body)
	a := answer{start: start}
	done := false
	for {
		line, err := w.reader.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			return false
		}
		if len(line) > 0 {
			content, end, valid := w.frame(bytes.TrimSpace(line))
			if !valid {
				return false
			}
			done = done || end
			if content {
				w.chunk(&a, body.last, win)
			}
		}
		if err != nil {
			return done && errors.Is(err, io.EOF)
		}
	}
}

// answer is the timing of one response: when it was sent, its first and latest chunk.
type answer struct{ start, first, previous time.Time }

// chunk counts one content chunk that arrived at `at`.
func (w *worker) chunk(a *answer, at time.Time, win window) {
	if a.first.IsZero() {
		a.first = at
		if win.holds(at) {
			w.ttft = append(w.ttft, at.Sub(a.start).Seconds())
		}
	} else if win.holds(at) {
		w.gapSum += at.Sub(a.previous).Seconds()
		w.gaps++
	}
	a.previous = at
	if win.holds(at) {
		w.chunks++
	}
}

// frame judges one line: whether it carries generated text, whether it ends the answer, and
// whether it is well formed (valid JSON; for SSE a data: line or the framing around one).
func (w *worker) frame(line []byte) (content, end, valid bool) {
	if len(line) == 0 {
		return false, false, true
	}
	if w.cfg.dialect == "ollama" {
		if !json.Valid(line) {
			return false, false, false
		}
		return hasContent(line), bytes.Contains(line, []byte(`"done":true`)), true
	}
	payload, isData := bytes.CutPrefix(line, []byte("data:"))
	if !isData {
		return false, false, true // event:, id:, retry: or a comment
	}
	payload = bytes.TrimSpace(payload)
	if bytes.Equal(payload, []byte("[DONE]")) {
		return false, true, true
	}
	if !json.Valid(payload) {
		return false, false, false
	}
	return hasContent(payload), false, true
}

// hasContent finds a non-empty "content" string without decoding the frame: JSON is already
// checked, and the client's core is shared with the upstream, so it must stay cheap.
func hasContent(frame []byte) bool {
	_, rest, found := bytes.Cut(frame, []byte(`"content":`))
	if !found {
		return false
	}
	rest = bytes.TrimLeft(rest, " ")
	return len(rest) > 1 && rest[0] == '"' && rest[1] != '"'
}

type wholeBody struct {
	Message struct {
		Content string `json:"content"`
	} `json:"message"`
	Choices []struct {
		Message struct {
			Content string `json:"content"`
		} `json:"message"`
	} `json:"choices"`
}

func (w *worker) consumeWhole(body *stamped, start time.Time, win window) bool {
	w.whole.Reset()
	if _, err := w.whole.ReadFrom(body); err != nil {
		return false
	}
	var parsed wholeBody
	if json.Unmarshal(w.whole.Bytes(), &parsed) != nil {
		return false
	}
	text := parsed.Message.Content
	if len(parsed.Choices) > 0 {
		text = parsed.Choices[0].Message.Content
	}
	if text == "" {
		return false
	}
	w.chunk(&answer{start: start}, body.last, win)
	return true
}

func summarise(cfg loadConfig, win window, workers []*worker) result {
	var all tally
	for _, w := range workers {
		all.requests += w.requests
		all.errors += w.errors
		all.chunks += w.chunks
		all.reads += w.reads
		all.bytes += w.bytes
		all.ttft = append(all.ttft, w.ttft...)
		all.gapSum += w.gapSum
		all.gaps += w.gaps
	}
	elapsed := win.end.Sub(win.start).Seconds()
	slices.Sort(all.ttft)
	res := result{Dialect: cfg.dialect, Stream: cfg.stream, Tokens: cfg.tokens,
		Connections: cfg.connections, IntervalUs: cfg.intervalUs, Requests: all.requests,
		Errors: all.errors, Chunks: all.chunks, Reads: all.reads, Bytes: all.bytes,
		Elapsed: elapsed, RequestsPerS: float64(all.requests) / elapsed,
		ChunksPerS: float64(all.chunks) / elapsed,
		TTFTP50:    percentile(all.ttft, 0.5), TTFTP99: percentile(all.ttft, 0.99)}
	if all.gaps > 0 {
		res.GapMean = all.gapSum / float64(all.gaps)
	}
	return res
}

// percentile is the nearest-rank quantile of sorted values (0 when there are none: JSON has
// no NaN).
func percentile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(len(sorted)-1, max(0, rank))]
}
