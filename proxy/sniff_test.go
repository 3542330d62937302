package proxy

import (
	"io"
	"net"
	"testing"
	"time"
)

func TestSniffH2C(t *testing.T) {
	tests := []struct {
		name   string
		chunks []string
		wantH2 bool
	}{
		{"HTTP/1.1 request", []string{"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"}, false},
		{"short HTTP/1.0 request decided without waiting", []string{"GET / HTTP/1.0\r\n\r\n"}, false},
		{"HTTP/2 preface", []string{h2Preface + "\x00\x00\x00\x04"}, true},
		{"HTTP/2 preface in pieces", []string{"PRI * HT", "TP/2.0\r\n", "\r\nSM\r\n\r\n"}, true},
		{"looks like the preface, then not", []string{"PRI * HTTP/1.1\r\n\r\n"}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			client, server := net.Pipe()
			defer client.Close()
			go func() {
				for _, c := range tc.chunks {
					client.Write([]byte(c))
					time.Sleep(10 * time.Millisecond)
				}
			}()
			done := make(chan struct{})
			var got net.Conn
			var isH2 bool
			go func() { got, isH2 = sniffH2C(server); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("sniffH2C blocked")
			}
			if isH2 != tc.wantH2 {
				t.Errorf("h2: got %v, want %v", isH2, tc.wantH2)
			}
			// What was read is replayed.
			first := make([]byte, 3)
			if _, err := io.ReadFull(got, first); err != nil || string(first) != tc.chunks[0][:3] {
				t.Errorf("replayed %q, %v; want %q", first, err, tc.chunks[0][:3])
			}
		})
	}
}
