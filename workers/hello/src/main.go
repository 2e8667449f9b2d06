// Command hello is a minimal TQServer Go worker.
//
// It listens on WORKER_HOST:WORKER_PORT (falling back to PORT and
// 127.0.0.1), and serves, with the /hello prefix already stripped by the
// proxy:
//
//	/        "Hello from Go!" plus the worker name and pid
//	/bench   a fixed "Hello, World!" (for load tests: as cheap as possible)
//	/health  200 "ok" (the supervisor's readiness and liveness probe)
//
// On SIGTERM or SIGINT it stops accepting, closes idle keep-alive
// connections, lets in-flight requests finish (at most WORKER_DRAIN_SECONDS,
// default 30) and exits 0.
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

var (
	benchBody   = []byte("Hello, World!")
	okBody      = []byte("ok")
	textPlain   = []string{"text/plain; charset=utf-8"}
	benchLength = []string{strconv.Itoa(len(benchBody))}
	okLength    = []string{strconv.Itoa(len(okBody))}
	noStore     = []string{"no-store"}
)

type handler struct {
	hello       []byte
	helloLength []string
	healthPath  string
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "405 method not allowed", http.StatusMethodNotAllowed)
		return
	}
	hdr := w.Header()
	switch r.URL.Path {
	case "/bench":
		// Pre-built header values and body: no allocation per request.
		hdr["Content-Type"] = textPlain
		hdr["Content-Length"] = benchLength
		_, _ = w.Write(benchBody)
	case "/", "":
		hdr["Content-Type"] = textPlain
		hdr["Content-Length"] = h.helloLength
		_, _ = w.Write(h.hello)
	case h.healthPath:
		hdr["Content-Type"] = textPlain
		hdr["Content-Length"] = okLength
		hdr["Cache-Control"] = noStore
		_, _ = w.Write(okBody)
	default:
		http.NotFound(w, r)
	}
}

func getenv(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix(fmt.Sprintf("hello[%d]: ", os.Getpid()))

	host := getenv("WORKER_HOST", "127.0.0.1")
	port := getenv("WORKER_PORT", getenv("PORT", "8080"))
	name := getenv("WORKER_NAME", "hello")
	healthPath := getenv("WORKER_HEALTH_PATH", "/health")
	drain := 30 * time.Second
	if v := os.Getenv("WORKER_DRAIN_SECONDS"); v != "" {
		if secs, err := strconv.ParseFloat(v, 64); err == nil && secs >= 0 {
			drain = time.Duration(secs * float64(time.Second))
		}
	}

	hello := []byte(fmt.Sprintf("Hello from Go!\nworker: %s, pid %d\n", name, os.Getpid()))
	h := &handler{
		hello:       hello,
		helloLength: []string{strconv.Itoa(len(hello))},
		healthPath:  healthPath,
	}

	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       60 * time.Second,
		WriteTimeout:      60 * time.Second,
		// Longer than the proxy keeps idle upstream connections, so that the
		// proxy, not the worker, closes them (no reuse-after-close race).
		IdleTimeout:    5 * time.Minute,
		MaxHeaderBytes: 1 << 20,
	}

	ln, err := net.Listen("tcp", net.JoinHostPort(host, port))
	if err != nil {
		log.Fatalf("cannot listen: %v", err)
	}
	log.Printf("%s listening on http://%s", name, ln.Addr())

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()

	select {
	case err := <-serveErr:
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Fatalf("serve: %v", err)
		}
		return
	case <-ctx.Done():
	}
	stop() // a second signal now gets the default behaviour: immediate exit

	log.Printf("stopping: draining in-flight requests (at most %s)", drain)
	shutdownCtx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		log.Printf("drain incomplete: %v", err)
		_ = srv.Close()
	}
	log.Printf("stopped")
}
