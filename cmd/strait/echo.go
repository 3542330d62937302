package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/straitmesh/strait/internal/atomicfile"
)

// echoReply is what `strait dev echo` answers.
type echoReply struct {
	Cluster  string `json:"cluster"`
	Service  string `json:"service"`
	Instance string `json:"instance"`
	// Caller is the caller's SPIFFE ID as verified by the sidecar (from
	// the X-Forwarded-Client-Cert header it sets), empty if none.
	Caller string `json:"caller"`
	Method string `json:"method"`
	Path   string `json:"path"`
	Bytes  int64  `json:"bytes"`
}

// callerFromXFCC extracts URI=... from the sidecar's XFCC header.
func callerFromXFCC(v string) string {
	for part := range strings.SplitSeq(v, ";") {
		if uri, ok := strings.CutPrefix(strings.TrimSpace(part), "URI="); ok {
			return uri
		}
	}
	return ""
}

func echoHandler(cluster, service, instance string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		code := http.StatusOK
		if s := r.URL.Query().Get("status"); s != "" {
			if c, err := strconv.Atoi(s); err == nil && c >= 200 && c <= 599 {
				code = c
			}
		}
		if d, err := time.ParseDuration(r.URL.Query().Get("delay")); err == nil && d > 0 && d <= 30*time.Second {
			select {
			case <-time.After(d):
			case <-r.Context().Done():
				return
			}
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(echoReply{Cluster: cluster, Service: service, Instance: instance,
			Caller: callerFromXFCC(r.Header.Get("X-Forwarded-Client-Cert")), Method: r.Method, Path: r.URL.Path, Bytes: n})
	})
}

func newDevEchoCmd(g *globals) *cobra.Command {
	var listen, cluster, service, instance, addrFile string
	cmd := &cobra.Command{
		Use:   "echo --listen HOST:PORT --service S --instance I",
		Short: "The sample application: answers with its cluster, service, instance and the caller's verified SPIFFE ID",
		Long: `The sample application. Every request is answered with JSON naming the
cluster, service and instance that served it and the caller's SPIFFE ID as
verified by the sidecar. ?status=503 answers with that status and
?delay=200ms waits first (for trying retries, timeouts and ejection).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if service == "" || instance == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--service and --instance are required")}
			}
			ln, err := net.Listen("tcp", listen)
			if err != nil {
				return err
			}
			fmt.Fprintf(g.stderr, "echo %s/%s listening on %s\n", service, instance, ln.Addr())
			if addrFile != "" {
				if err := atomicfile.WriteFile(addrFile, []byte(ln.Addr().String()+"\n"), 0o644); err != nil {
					ln.Close()
					return err
				}
			}
			srv := &http.Server{Handler: echoHandler(cluster, service, instance), ReadHeaderTimeout: 10 * time.Second}
			go func() {
				<-cmd.Context().Done()
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				srv.Shutdown(ctx)
			}()
			if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:8080", "listen address")
	cmd.Flags().StringVar(&cluster, "cluster", "", "cluster name to report")
	cmd.Flags().StringVar(&service, "service", "", "service name to report")
	cmd.Flags().StringVar(&instance, "instance", "", "instance name to report")
	cmd.Flags().StringVar(&addrFile, "address-file", "", "write the bound address to this file once listening")
	return cmd
}
