package wiring

import (
	"net"
	"sync"
)

// handoff accepts on one listener and hands each connection to whichever
// view is current, so a server can stop (closing its view) and another
// take over the same address without a moment of refused connections.
type handoff struct {
	ln    net.Listener
	conns chan net.Conn
	errc  chan error
}

func newHandoff(ln net.Listener) *handoff {
	h := &handoff{ln: ln, conns: make(chan net.Conn), errc: make(chan error, 1)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				h.errc <- err
				close(h.conns)
				return
			}
			h.conns <- c
		}
	}()
	return h
}

// view returns a listener reading from the handoff; closing it leaves the
// underlying listener open.
func (h *handoff) view() net.Listener {
	return &handoffView{h: h, closed: make(chan struct{})}
}

// Close closes the underlying listener.
func (h *handoff) Close() error { return h.ln.Close() }

type handoffView struct {
	h      *handoff
	once   sync.Once
	closed chan struct{}
}

func (v *handoffView) Accept() (net.Conn, error) {
	select {
	case <-v.closed:
		return nil, net.ErrClosed
	case c, ok := <-v.h.conns:
		if !ok {
			return nil, net.ErrClosed
		}
		return c, nil
	}
}

func (v *handoffView) Close() error {
	v.once.Do(func() { close(v.closed) })
	return nil
}

func (v *handoffView) Addr() net.Addr { return v.h.ln.Addr() }
