package token

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// Limits on gateway addresses.
const (
	MaxGatewayAddrs = 8
	maxHostLength   = 253 // RFC 1035 name length, dots included, no trailing dot
	maxLabelLength  = 63
)

// Address types on the wire.
const (
	addrIPv4 byte = 1
	addrIPv6 byte = 2
	addrName byte = 3
)

// gateway is one gateway address in canonical form: either addr (an IPv4
// address, or an IPv6 address that is not IPv4-mapped, without zone) or host
// (a lower-case DNS name), and a non-zero port.
type gateway struct {
	addr netip.Addr
	host string
	port uint16
}

func (g gateway) String() string {
	if g.host != "" {
		return net.JoinHostPort(g.host, strconv.Itoa(int(g.port)))
	}
	return netip.AddrPortFrom(g.addr, g.port).String()
}

// parseGateway parses host:port as New's callers write it and returns its
// canonical form: IP addresses as netip writes them, hostnames in lower case.
func parseGateway(s string) (gateway, error) {
	host, portStr, err := net.SplitHostPort(s)
	if err != nil {
		return gateway{}, fmt.Errorf("gateway address %q: want host:port (with [brackets] around an IPv6 address)", s)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 {
		return gateway{}, fmt.Errorf("gateway address %q: port must be a number from 1 to 65535", s)
	}
	g := gateway{port: uint16(port)}
	if ip, err := netip.ParseAddr(host); err == nil {
		g.addr = ip
	} else if strings.ContainsAny(host, ":%") || (strings.HasPrefix(s, "[") && host != "") {
		return gateway{}, fmt.Errorf("gateway address %q: %q is not a valid IP address", s, host)
	} else {
		g.host = strings.ToLower(host)
	}
	if err := g.check(); err != nil {
		return gateway{}, fmt.Errorf("gateway address %q: %v", s, err)
	}
	return g, nil
}

// check reports whether g is valid and canonical.
func (g gateway) check() error {
	if g.port == 0 {
		return fmt.Errorf("port is 0")
	}
	if g.host != "" {
		if g.addr.IsValid() {
			return fmt.Errorf("both a hostname and an IP address")
		}
		return checkHostname(g.host)
	}
	a := g.addr
	switch {
	case !a.IsValid():
		return fmt.Errorf("host is empty")
	case a.Zone() != "":
		return fmt.Errorf("IPv6 zone %q is meaningful only on the issuing host", a.Zone())
	case a.Is4In6():
		return fmt.Errorf("IPv4-mapped IPv6 address %s: write it as %s", a, a.Unmap())
	case a.IsUnspecified():
		return fmt.Errorf("unspecified address %s cannot be dialled", a)
	case a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return fmt.Errorf("%s is not a unicast address", a)
	}
	return nil
}

// checkHostname checks a DNS name in the form RFC 1123 allows for hosts,
// in lower case, without a trailing dot, and not all digits and dots (which
// resolvers could read as an IPv4 address).
func checkHostname(h string) error {
	if len(h) > maxHostLength {
		return fmt.Errorf("hostname is %d bytes, more than the limit of %d", len(h), maxHostLength)
	}
	labels := strings.Split(h, ".")
	for _, l := range labels {
		if l == "" || len(l) > maxLabelLength {
			return fmt.Errorf("hostname %q: each dot-separated label must be 1 to %d characters", h, maxLabelLength)
		}
		if l[0] == '-' || l[len(l)-1] == '-' {
			return fmt.Errorf("hostname %q: labels may not start or end with '-'", h)
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
				return fmt.Errorf("hostname %q: only lower-case letters, digits, '-' and '.' are allowed", h)
			}
		}
	}
	last := labels[len(labels)-1]
	if strings.Trim(last, "0123456789") == "" {
		return fmt.Errorf("hostname %q ends in a number: write IP addresses in their standard form", h)
	}
	return nil
}

// appendGateway appends g's wire form.
func appendGateway(b []byte, g gateway) []byte {
	switch {
	case g.host != "":
		b = append(b, addrName, byte(len(g.host)))
		b = append(b, g.host...)
	case g.addr.Is4():
		a := g.addr.As4()
		b = append(b, addrIPv4)
		b = append(b, a[:]...)
	default:
		a := g.addr.As16()
		b = append(b, addrIPv6)
		b = append(b, a[:]...)
	}
	return append(b, byte(g.port>>8), byte(g.port))
}

// readGateway reads one gateway address from r; it does not check it.
func readGateway(r *reader) (gateway, error) {
	var g gateway
	switch typ := r.byte(); typ {
	case addrIPv4:
		g.addr = netip.AddrFrom4([4]byte(r.bytes(4)))
	case addrIPv6:
		g.addr = netip.AddrFrom16([16]byte(r.bytes(16)))
	case addrName:
		g.host = r.str8()
		if g.host == "" && !r.short {
			return g, fmt.Errorf("empty hostname")
		}
	default:
		if r.short {
			return g, nil
		}
		return g, fmt.Errorf("unknown address type %d", typ)
	}
	g.port = r.uint16()
	return g, nil
}
