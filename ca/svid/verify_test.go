package svid_test

import (
	"bufio"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/svid"
)

const tdName = "strait.example"

var (
	td          = spiffeid.RequireTrustDomainFromString(tdName)
	oidKeyUsage = asn1.ObjectIdentifier{2, 5, 29, 15}
)

// hierarchy is a hand-built root and intermediate, both name-constrained to
// URIs in strait.example, for leaves catest cannot mint.
type hierarchy struct {
	root     *x509.Certificate
	rootKey  crypto.Signer
	inter    *x509.Certificate
	interKey crypto.Signer
	notAfter time.Time
}

var serial atomic.Int64

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func sign(t *testing.T, tmpl, parent *x509.Certificate, pub crypto.PublicKey, parentKey crypto.Signer) *x509.Certificate {
	t.Helper()
	tmpl.SerialNumber = big.NewInt(serial.Add(1))
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
	if err != nil {
		t.Fatalf("create certificate %q: %v", tmpl.Subject.CommonName, err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("parse certificate %q: %v", tmpl.Subject.CommonName, err)
	}
	return c
}

// caTemplate is a signing CA constrained to URIs in strait.example.
func caTemplate(cn string, maxPathLen int, notBefore, notAfter time.Time) *x509.Certificate {
	return &x509.Certificate{
		Subject:                     pkix.Name{CommonName: cn},
		NotBefore:                   notBefore,
		NotAfter:                    notAfter,
		IsCA:                        true,
		BasicConstraintsValid:       true,
		MaxPathLen:                  maxPathLen,
		MaxPathLenZero:              maxPathLen == 0,
		KeyUsage:                    x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		PermittedURIDomains:         []string{tdName},
		PermittedDNSDomainsCritical: true, // marks the whole name constraints extension critical
	}
}

func newHierarchy(t *testing.T) *hierarchy {
	t.Helper()
	now := time.Now()
	h := &hierarchy{notAfter: now.Add(24 * time.Hour)}
	rootKey := newKey(t)
	rootTmpl := caTemplate("test root", 1, now.Add(-time.Hour), h.notAfter)
	h.root, h.rootKey = sign(t, rootTmpl, rootTmpl, rootKey.Public(), rootKey), rootKey
	h.inter, h.interKey = h.intermediate(t, "test intermediate", now.Add(-time.Hour), h.notAfter)
	return h
}

// intermediate signs a pathlen-0 intermediate under the root.
func (h *hierarchy) intermediate(t *testing.T, cn string, notBefore, notAfter time.Time) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	k := newKey(t)
	return sign(t, caTemplate(cn, 0, notBefore, notAfter), h.root, k.Public(), h.rootKey), k
}

// bundle returns a strait.example bundle holding the hierarchy's root.
func (h *hierarchy) bundle(t *testing.T) *bundle.Bundle {
	t.Helper()
	b, err := bundle.New(td, 1, []*x509.Certificate{h.root})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// leafOpts describes a hand-made leaf. The zero value is a good SVID for
// spiffe://strait.example/ns/a/sa/b.
type leafOpts struct {
	uris        []string // default: one workload ID
	isCA        bool
	keyUsage    x509.KeyUsage // 0 with noKeyUsage false: digitalSignature
	noKeyUsage  bool          // omit the key usage extension
	kuNonCrit   bool          // digitalSignature, but not critical
	extKeyUsage []x509.ExtKeyUsage
	noEKU       bool
	notBefore   time.Time
	notAfter    time.Time
	parent      *x509.Certificate // default: the intermediate
	parentKey   crypto.Signer
}

func (h *hierarchy) leaf(t *testing.T, o leafOpts) *x509.Certificate {
	t.Helper()
	if o.uris == nil {
		o.uris = []string{"spiffe://strait.example/ns/a/sa/b"}
	}
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "test leaf"},
		NotBefore:             o.notBefore,
		NotAfter:              o.notAfter,
		BasicConstraintsValid: true,
		IsCA:                  o.isCA,
		KeyUsage:              o.keyUsage,
		ExtKeyUsage:           o.extKeyUsage,
	}
	if tmpl.NotBefore.IsZero() {
		tmpl.NotBefore = time.Now().Add(-time.Minute)
	}
	if tmpl.NotAfter.IsZero() {
		tmpl.NotAfter = time.Now().Add(time.Hour)
	}
	for _, s := range o.uris {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, u)
	}
	switch {
	case o.noKeyUsage:
		tmpl.KeyUsage = 0
	case o.kuNonCrit:
		tmpl.KeyUsage = 0
		val, err := asn1.Marshal(asn1.BitString{Bytes: []byte{0x80}, BitLength: 1})
		if err != nil {
			t.Fatal(err)
		}
		tmpl.ExtraExtensions = append(tmpl.ExtraExtensions, pkix.Extension{Id: oidKeyUsage, Critical: false, Value: val})
	case tmpl.KeyUsage == 0:
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	}
	if o.noEKU {
		tmpl.ExtKeyUsage = nil
	} else if tmpl.ExtKeyUsage == nil {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	parent, parentKey := h.inter, h.interKey
	if o.parent != nil {
		parent, parentKey = o.parent, o.parentKey
	}
	return sign(t, tmpl, parent, newKey(t).Public(), parentKey)
}

// anySource returns the same roots for every trust domain.
type anySource []*x509.Certificate

func (s anySource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return x509bundle.FromX509Authorities(td, s), nil
}

// swapSource is a bundle source whose bundle can be replaced atomically.
type swapSource struct{ b atomic.Pointer[bundle.Bundle] }

func (s *swapSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return s.b.Load().GetX509BundleForTrustDomain(td)
}

func newVerifier(t *testing.T, trustDomain spiffeid.TrustDomain, src x509bundle.Source, clock func() time.Time) *svid.Verifier {
	t.Helper()
	v, err := svid.NewVerifier(svid.VerifierConfig{TrustDomain: trustDomain, Bundles: src, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestVerify(t *testing.T) {
	c := catest.New(t, tdName)
	other := catest.New(t, "other.example")
	foreign := catest.New(t, tdName) // same trust domain, different root

	good := c.SVID(t, "spiffe://strait.example/ns/a/sa/b", 0)
	goodLeaf := good.Certificates[0]
	otherSVID := other.SVID(t, "spiffe://other.example/ns/a/sa/b", 0)
	foreignSVID := foreign.SVID(t, "spiffe://strait.example/ns/a/sa/b", 0)

	h := newHierarchy(t)
	hb := h.bundle(t)
	inter := h.inter
	withInter := func(leaf *x509.Certificate) []*x509.Certificate { return []*x509.Certificate{leaf, inter} }

	// An intermediate that expires before the leaf it signed.
	shortInter, shortInterKey := h.intermediate(t, "short intermediate", time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
	afterShortInter := shortInter.NotAfter.Add(30 * time.Minute)
	leafUnderShort := h.leaf(t, leafOpts{parent: shortInter, parentKey: shortInterKey, notAfter: time.Now().Add(10 * time.Hour)})

	// An intermediate not valid yet, with a leaf already valid under it.
	lateInter, lateInterKey := h.intermediate(t, "late intermediate", time.Now().Add(time.Hour), time.Now().Add(3*time.Hour))
	leafUnderLate := h.leaf(t, leafOpts{parent: lateInter, parentKey: lateInterKey})

	// A sub-CA under the pathlen-0 intermediate, and a leaf under it.
	subKey := newKey(t)
	subTmpl := caTemplate("sub CA", -1, // no path length limit of its own
		time.Now().Add(-time.Hour), h.notAfter)
	subCA := sign(t, subTmpl, h.inter, subKey.Public(), h.interKey)
	leafUnderSub := h.leaf(t, leafOpts{parent: subCA, parentKey: subKey})

	longSeg := "spiffe://strait.example/ns/" + strings.Repeat("a", 300) + "/sa/b"
	longID := "spiffe://strait.example/" + strings.TrimSuffix(strings.Repeat("abcdefghi/", 210), "/")

	tooLong := []*x509.Certificate{goodLeaf}
	for len(tooLong) <= svid.MaxChainLength {
		tooLong = append(tooLong, c.Issuer.Chain()...)
	}

	tests := []struct {
		name       string
		chain      []*x509.Certificate
		role       svid.Role
		now        time.Time // zero: time.Now
		td         string    // default strait.example
		bundles    x509bundle.Source
		wantID     string
		wantReason svid.Reason
		wantMsg    string
	}{
		{name: "catest SVID as server", chain: good.Certificates, role: svid.RoleServer, wantID: good.ID.String()},
		{name: "catest SVID as client", chain: good.Certificates, role: svid.RoleClient, wantID: good.ID.String()},
		{name: "catest SVID for any role", chain: good.Certificates, role: svid.RoleAny, wantID: good.ID.String()},
		{
			name: "hand-made good leaf", chain: withInter(h.leaf(t, leafOpts{})), role: svid.RoleClient,
			bundles: hb, wantID: "spiffe://strait.example/ns/a/sa/b",
		},
		{
			name: "serverAuth-only leaf as server", chain: withInter(h.leaf(t, leafOpts{extKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})),
			role: svid.RoleServer, bundles: hb, wantID: "spiffe://strait.example/ns/a/sa/b",
		},
		{
			name: "anyExtendedKeyUsage leaf as client", chain: withInter(h.leaf(t, leafOpts{extKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})),
			role: svid.RoleClient, bundles: hb, wantID: "spiffe://strait.example/ns/a/sa/b",
		},
		{
			name: "two URI SANs", chain: withInter(h.leaf(t, leafOpts{uris: []string{"spiffe://strait.example/ns/a/sa/b", "spiffe://strait.example/ns/a/sa/c"}})),
			role: svid.RoleClient, bundles: hb, wantReason: svid.ReasonBadID, wantMsg: "2 URI SANs",
		},
		{
			name: "no URI SAN", chain: withInter(h.leaf(t, leafOpts{uris: []string{}})),
			role: svid.RoleClient, bundles: hb, wantReason: svid.ReasonBadID, wantMsg: "0 URI SANs",
		},
		{
			name: "leaf is a CA", chain: withInter(h.leaf(t, leafOpts{isCA: true, keyUsage: x509.KeyUsageDigitalSignature})),
			role: svid.RoleClient, bundles: hb, wantReason: svid.ReasonCA, wantMsg: "is a CA certificate",
		},
		{
			name: "other trust domain", chain: otherSVID.Certificates, role: svid.RoleClient,
			wantReason: svid.ReasonWrongTrustDomain, wantMsg: `"other.example"`,
		},
		{
			name: "expired leaf", chain: good.Certificates, role: svid.RoleClient, now: goodLeaf.NotAfter.Add(time.Minute),
			wantReason: svid.ReasonExpired, wantMsg: "expired at",
		},
		{
			name: "leaf not yet valid", chain: good.Certificates, role: svid.RoleClient, now: goodLeaf.NotBefore.Add(-time.Minute),
			wantReason: svid.ReasonNotYetValid, wantMsg: "not valid until",
		},
		{
			name: "expired intermediate", chain: []*x509.Certificate{leafUnderShort, shortInter}, role: svid.RoleClient,
			now: afterShortInter, bundles: hb, wantReason: svid.ReasonExpired, wantMsg: "expired",
		},
		{
			name: "intermediate not yet valid", chain: []*x509.Certificate{leafUnderLate, lateInter}, role: svid.RoleClient,
			bundles: hb, wantReason: svid.ReasonNotYetValid, wantMsg: "expired or is not yet valid",
		},
		{
			name: "nil certificate in the chain", chain: []*x509.Certificate{goodLeaf, nil}, role: svid.RoleClient,
			wantReason: svid.ReasonMalformed, wantMsg: "nil certificate",
		},
		{
			name: "foreign root, same trust domain", chain: foreignSVID.Certificates, role: svid.RoleClient,
			wantReason: svid.ReasonUntrusted, wantMsg: "unknown authority",
		},
		{
			name: "leaf without its intermediate", chain: []*x509.Certificate{goodLeaf}, role: svid.RoleClient,
			wantReason: svid.ReasonUntrusted, wantMsg: "unknown authority",
		},
		{
			name: "name constraint escape", role: svid.RoleClient, td: "evil.example", bundles: anySource{h.root},
			chain:      withInter(h.leaf(t, leafOpts{uris: []string{"spiffe://evil.example/ns/a/sa/b"}})),
			wantReason: svid.ReasonUntrusted, wantMsg: "constraint",
		},
		{
			name: "path length violation", chain: []*x509.Certificate{leafUnderSub, subCA, h.inter}, role: svid.RoleClient,
			bundles: hb, wantReason: svid.ReasonUntrusted, wantMsg: "path length",
		},
		{
			name: "non-CA in chain", chain: []*x509.Certificate{goodLeaf, goodLeaf}, role: svid.RoleClient,
			wantReason: svid.ReasonMalformed, wantMsg: "not a signing CA",
		},
		{
			name: "root-path ID", chain: withInter(h.leaf(t, leafOpts{uris: []string{"spiffe://strait.example"}})),
			role: svid.RoleClient, bundles: hb, wantReason: svid.ReasonBadID, wantMsg: "no path",
		},
		{
			name: "key usage missing", chain: withInter(h.leaf(t, leafOpts{noKeyUsage: true})),
			role: svid.RoleClient, bundles: hb, wantReason: svid.ReasonKeyUsage, wantMsg: "missing",
		},
		{
			name: "key usage not critical", chain: withInter(h.leaf(t, leafOpts{kuNonCrit: true})),
			role: svid.RoleClient, bundles: hb, wantReason: svid.ReasonKeyUsage, wantMsg: "not critical",
		},
		{
			name: "key usage without digitalSignature", chain: withInter(h.leaf(t, leafOpts{keyUsage: x509.KeyUsageKeyEncipherment})),
			role: svid.RoleClient, bundles: hb, wantReason: svid.ReasonKeyUsage, wantMsg: "lacks digitalSignature",
		},
		{
			name: "key usage with certSign", chain: withInter(h.leaf(t, leafOpts{keyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign})),
			role: svid.RoleClient, bundles: hb, wantReason: svid.ReasonKeyUsage, wantMsg: "certificate or CRL signing",
		},
		{
			name: "key usage with CRLSign", chain: withInter(h.leaf(t, leafOpts{keyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign})),
			role: svid.RoleClient, bundles: hb, wantReason: svid.ReasonKeyUsage, wantMsg: "certificate or CRL signing",
		},
		{
			name: "serverAuth-only leaf as client", chain: withInter(h.leaf(t, leafOpts{extKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})),
			role: svid.RoleClient, bundles: hb, wantReason: svid.ReasonExtKeyUsage, wantMsg: "does not allow clientAuth",
		},
		{
			name: "clientAuth-only leaf as server", chain: withInter(h.leaf(t, leafOpts{extKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})),
			role: svid.RoleServer, bundles: hb, wantReason: svid.ReasonExtKeyUsage, wantMsg: "does not allow serverAuth",
		},
		{
			name: "leaf without EKU", chain: withInter(h.leaf(t, leafOpts{noEKU: true})),
			role: svid.RoleClient, bundles: hb, wantReason: svid.ReasonExtKeyUsage, wantMsg: "extended key usage is missing",
		},
		{
			name: "codeSigning-only leaf for any role", chain: withInter(h.leaf(t, leafOpts{extKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning}})),
			role: svid.RoleAny, bundles: hb, wantReason: svid.ReasonExtKeyUsage, wantMsg: "neither serverAuth nor clientAuth",
		},
		{name: "empty chain", chain: nil, role: svid.RoleClient, wantReason: svid.ReasonNoCertificate, wantMsg: "no certificate"},
		{
			name: "chain too long", chain: tooLong, role: svid.RoleClient,
			wantReason: svid.ReasonMalformed, wantMsg: fmt.Sprintf("limit of %d", svid.MaxChainLength),
		},
		{
			name: "path segment too long", chain: withInter(h.leaf(t, leafOpts{uris: []string{longSeg}})),
			role: svid.RoleClient, bundles: hb, wantReason: svid.ReasonBadID, wantMsg: "path segment of 300 bytes",
		},
		{
			name: "ID too long", chain: withInter(h.leaf(t, leafOpts{uris: []string{longID}})),
			role: svid.RoleClient, bundles: hb, wantReason: svid.ReasonBadID, wantMsg: "more than the limit of 2048",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			trustDomain := td
			if tc.td != "" {
				trustDomain = spiffeid.RequireTrustDomainFromString(tc.td)
			}
			var src x509bundle.Source = c.Bundle()
			if tc.bundles != nil {
				src = tc.bundles
			}
			clock := time.Now
			if !tc.now.IsZero() {
				clock = func() time.Time { return tc.now }
			}
			v := newVerifier(t, trustDomain, src, clock)

			id, chains, err := v.Verify(tc.chain, tc.role)
			if tc.wantReason == "" {
				if err != nil {
					t.Fatalf("Verify: got error %v (reason %q), want ID %s", err, svid.ReasonOf(err), tc.wantID)
				}
				if got := id.String(); got != tc.wantID {
					t.Errorf("Verify: got ID %s, want %s", got, tc.wantID)
				}
				if len(chains) == 0 {
					t.Errorf("Verify: got no verified chains, want at least one")
				}
				return
			}
			if err == nil {
				t.Fatalf("Verify: got ID %s and no error, want reason %q", id, tc.wantReason)
			}
			t.Logf("Verify: %v", err)
			var verr *svid.Error
			if !errors.As(err, &verr) {
				t.Fatalf("Verify: got error of type %T (%v), want *svid.Error", err, err)
			}
			if got := svid.ReasonOf(err); got != tc.wantReason {
				t.Errorf("Verify: got reason %q (%v), want %q", got, err, tc.wantReason)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("Verify: got message %q, want it to contain %q", err, tc.wantMsg)
			}
			if chains != nil {
				t.Errorf("Verify: got %d chains with an error, want none", len(chains))
			}

			// VerifyRaw must agree with Verify (DER cannot hold a nil).
			if slices.Contains(tc.chain, nil) {
				return
			}
			raw := make([][]byte, len(tc.chain))
			for i, c := range tc.chain {
				raw[i] = c.Raw
			}
			if _, err := v.VerifyRaw(raw, tc.role); svid.ReasonOf(err) != tc.wantReason {
				t.Errorf("VerifyRaw: got reason %q (%v), want %q", svid.ReasonOf(err), err, tc.wantReason)
			}
		})
	}
}

func TestReasonOf(t *testing.T) {
	if got := svid.ReasonOf(errors.New("plain")); got != "" {
		t.Errorf("ReasonOf(plain error): got %q, want empty", got)
	}
	wrapped := fmt.Errorf("outer: %w", &svid.Error{Reason: svid.ReasonExpired, Err: errors.New("inner")})
	if got := svid.ReasonOf(wrapped); got != svid.ReasonExpired {
		t.Errorf("ReasonOf(wrapped): got %q, want %q", got, svid.ReasonExpired)
	}
}

func tlsCert(s *x509svid.SVID) tls.Certificate {
	var cert tls.Certificate
	for _, c := range s.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	cert.PrivateKey = s.PrivateKey
	cert.Leaf = s.Certificates[0]
	return cert
}

const ioTimeout = 5 * time.Second

// startServer runs a TLS echo server (one line per connection) on 127.0.0.1
// and reports each connection's handshake result on the returned channel.
func startServer(t *testing.T, cfg *tls.Config) (string, <-chan error) {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	results := make(chan error, 16)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(ioTimeout))
				err := conn.(*tls.Conn).Handshake()
				results <- err
				if err != nil {
					return
				}
				line, err := bufio.NewReader(conn).ReadString('\n')
				if err != nil {
					return
				}
				conn.Write([]byte("echo " + line))
			}()
		}
	}()
	return ln.Addr().String(), results
}

// serverResult waits (bounded) for the server's handshake result.
func serverResult(t *testing.T, results <-chan error) error {
	t.Helper()
	select {
	case err := <-results:
		return err
	case <-time.After(ioTimeout):
		t.Fatal("timed out waiting for the server handshake")
		return nil
	}
}

// roundTrip dials addr, handshakes, writes a line and reads the echo.
func roundTrip(addr string, cfg *tls.Config) (tls.ConnectionState, error) {
	d := &net.Dialer{Timeout: ioTimeout}
	raw, err := d.Dial("tcp", addr)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(ioTimeout))
	conn := tls.Client(raw, cfg)
	if err := conn.Handshake(); err != nil {
		return conn.ConnectionState(), fmt.Errorf("handshake: %w", err)
	}
	cs := conn.ConnectionState()
	if _, err := conn.Write([]byte("ping\n")); err != nil {
		return cs, fmt.Errorf("write: %w", err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return cs, fmt.Errorf("read: %w", err)
	}
	if line != "echo ping\n" {
		return cs, fmt.Errorf("read %q, want %q", line, "echo ping\n")
	}
	return cs, nil
}

func TestVerifyConnection(t *testing.T) {
	c := catest.New(t, tdName)
	foreign := catest.New(t, tdName)

	const allowed = "spiffe://strait.example/ns/a/sa/allowed"
	authorize := func(id spiffeid.ID) error {
		if id.String() != allowed {
			return errors.New("not on the allow list")
		}
		return nil
	}

	serverSVID := c.SVID(t, "spiffe://strait.example/ns/a/sa/server", 0)
	serverBundles := &swapSource{}
	serverBundles.b.Store(c.Bundle())
	serverVerifier := newVerifier(t, td, serverBundles, nil)
	addr, results := startServer(t, &tls.Config{
		Certificates:     []tls.Certificate{tlsCert(serverSVID)},
		MinVersion:       tls.VersionTLS13,
		ClientAuth:       tls.RequireAnyClientCert,
		VerifyConnection: serverVerifier.VerifyConnection(svid.RoleClient, authorize),
	})

	clientVerifier := newVerifier(t, td, c.Bundle(), nil)
	clientConfig := func(s *x509svid.SVID) *tls.Config {
		return &tls.Config{
			Certificates:       []tls.Certificate{tlsCert(s)},
			MinVersion:         tls.VersionTLS13,
			InsecureSkipVerify: true, // VerifyConnection is the verification
			VerifyConnection:   clientVerifier.VerifyConnection(svid.RoleServer, nil),
		}
	}

	t.Run("allowed client", func(t *testing.T) {
		_, err := roundTrip(addr, clientConfig(c.SVID(t, allowed, 0)))
		if err != nil {
			t.Fatalf("client: got %v, want success", err)
		}
		if err := serverResult(t, results); err != nil {
			t.Fatalf("server: got %v, want success", err)
		}
	})

	t.Run("denied client", func(t *testing.T) {
		_, err := roundTrip(addr, clientConfig(c.SVID(t, "spiffe://strait.example/ns/a/sa/denied", 0)))
		serr := serverResult(t, results)
		if err == nil {
			t.Fatal("client: got success, want the server to refuse")
		}
		if serr == nil || !strings.Contains(serr.Error(), "not authorized") {
			t.Fatalf("server: got %v, want an error containing %q", serr, "not authorized")
		}
		if got := svid.ReasonOf(serr); got != "" {
			t.Errorf("server: got reason %q for an authorization refusal, want none", got)
		}
	})

	t.Run("foreign client", func(t *testing.T) {
		_, err := roundTrip(addr, clientConfig(foreign.SVID(t, allowed, 0)))
		serr := serverResult(t, results)
		if err == nil {
			t.Fatal("client: got success, want the server to refuse")
		}
		if got := svid.ReasonOf(serr); got != svid.ReasonUntrusted {
			t.Fatalf("server: got %v (reason %q), want reason %q", serr, got, svid.ReasonUntrusted)
		}
	})

	t.Run("client refuses foreign server", func(t *testing.T) {
		foreignServer := foreign.SVID(t, "spiffe://strait.example/ns/a/sa/server", 0)
		faddr, fresults := startServer(t, &tls.Config{
			Certificates: []tls.Certificate{tlsCert(foreignServer)},
			MinVersion:   tls.VersionTLS13,
			ClientAuth:   tls.RequireAnyClientCert,
		})
		_, err := roundTrip(faddr, clientConfig(c.SVID(t, allowed, 0)))
		if got := svid.ReasonOf(err); got != svid.ReasonUntrusted {
			t.Fatalf("client: got %v (reason %q), want reason %q", err, got, svid.ReasonUntrusted)
		}
		if err := serverResult(t, fresults); err == nil {
			t.Errorf("server: got a completed handshake, want it to fail")
		}
	})

	t.Run("resumption after trust change", func(t *testing.T) {
		cfg := clientConfig(c.SVID(t, allowed, 0))
		cfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)

		cs, err := roundTrip(addr, cfg)
		if err != nil {
			t.Fatalf("first connection: got %v, want success", err)
		}
		if err := serverResult(t, results); err != nil {
			t.Fatalf("first connection, server: got %v, want success", err)
		}
		if cs.DidResume {
			t.Fatalf("first connection: got DidResume true, want a full handshake")
		}

		// Sanity check: with unchanged trust the session resumes.
		cs, err = roundTrip(addr, cfg)
		if err != nil {
			t.Fatalf("second connection: got %v, want success", err)
		}
		if err := serverResult(t, results); err != nil {
			t.Fatalf("second connection, server: got %v, want success", err)
		}
		if !cs.DidResume {
			t.Fatalf("second connection: got DidResume false, want a resumed session")
		}

		// Trust changes: the server's bundle no longer holds c's root.
		serverBundles.b.Store(foreign.Bundle())
		t.Cleanup(func() { serverBundles.b.Store(c.Bundle()) })

		cs, err = roundTrip(addr, cfg)
		serr := serverResult(t, results)
		if err == nil {
			t.Fatal("resumed connection after trust change: got success, want the server to refuse")
		}
		if !cs.DidResume {
			t.Errorf("resumed connection after trust change: got DidResume false, want the client to have resumed")
		}
		if got := svid.ReasonOf(serr); got != svid.ReasonUntrusted {
			t.Fatalf("resumed connection, server: got %v (reason %q), want reason %q", serr, got, svid.ReasonUntrusted)
		}
	})
}

func TestRenewAt(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	cert := func(nb, na time.Duration) *x509.Certificate {
		return &x509.Certificate{NotBefore: now.Add(nb), NotAfter: now.Add(na)}
	}
	tests := []struct {
		name string
		leaf *x509.Certificate
		want time.Time
	}{
		{"fresh: half life", cert(-10*time.Second, 50*time.Minute), now.Add(25*time.Minute - 5*time.Second)},
		{"half life past: half of what is left", cert(-time.Hour, 20*time.Minute), now.Add(10 * time.Minute)},
		{"short backdated SVID: never a spin", cert(-10*time.Second, 5*time.Second), now.Add(2500 * time.Millisecond)},
		{"expired: a second from now", cert(-time.Hour, -time.Minute), now.Add(time.Second)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := svid.RenewAt(tc.leaf, now); !got.Equal(tc.want) {
				t.Errorf("got %s, want %s", got, tc.want)
			}
		})
	}
}

// TestVerifyClusterScopedIssuer: a control plane, gateway or admin identity
// of a cluster verifies only when that cluster's intermediate issued it;
// any cluster's intermediate may issue a workload identity.
func TestVerifyClusterScopedIssuer(t *testing.T) {
	c := catest.New(t, tdName) // east's intermediate
	v := newVerifier(t, td, c.Bundle(), nil)
	west := c.IssuerFor(t, "west")
	for _, id := range []string{"spiffe://strait.example/cluster/east/admin", "spiffe://strait.example/cluster/east/gateway", "spiffe://strait.example/cluster/east/controlplane"} {
		own := c.SVID(t, id, 0)
		if _, _, err := v.Verify(own.Certificates, svid.RoleAny); err != nil {
			t.Errorf("%s from east's intermediate: %v", id, err)
		}
		forged, err := west.MintSVID(spiffeid.RequireFromString(id), 0)
		if err != nil {
			t.Fatal(err)
		}
		_, _, err = v.Verify(forged.Certificates, svid.RoleAny)
		if svid.ReasonOf(err) != svid.ReasonWrongIssuer {
			t.Errorf("%s from west's intermediate: %v, want %s", id, err, svid.ReasonWrongIssuer)
		}
	}
	wl, err := west.MintSVID(spiffeid.RequireFromString("spiffe://strait.example/ns/a/sa/b"), 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := v.Verify(wl.Certificates, svid.RoleAny); err != nil {
		t.Errorf("a workload SVID from west's intermediate: %v", err)
	}
	if got := svid.IntermediateCluster(wl.Certificates[1]); got != "west" {
		t.Errorf("IntermediateCluster of west's intermediate = %q", got)
	}
	if got := svid.IntermediateCluster(wl.Certificates[0]); got != "" {
		t.Errorf("IntermediateCluster of a leaf = %q", got)
	}
}

// A verification is remembered only for the same chain, role and roots,
// and only while every certificate of the path is valid: a root removed,
// or an intermediate expired before the leaf, is seen at once.
func TestVerifyRemembersOnlyWhatStillHolds(t *testing.T) {
	h := newHierarchy(t)
	now := time.Now()
	clock := func() time.Time { return now }
	inter, interKey := h.intermediate(t, "short intermediate", now.Add(-time.Hour), now.Add(10*time.Minute))
	leaf := h.leaf(t, leafOpts{parent: inter, parentKey: interKey, notAfter: now.Add(time.Hour)})
	chain := []*x509.Certificate{leaf, inter}
	src := &swapSource{}
	src.b.Store(h.bundle(t))
	v := newVerifier(t, td, src, clock)

	for i := range 2 {
		if _, _, err := v.Verify(chain, svid.RoleAny); err != nil {
			t.Fatalf("verify %d: %v", i, err)
		}
	}
	// The root leaves the bundle: refused at once.
	other := newHierarchy(t)
	src.b.Store(other.bundle(t))
	if _, _, err := v.Verify(chain, svid.RoleAny); svid.ReasonOf(err) != svid.ReasonUntrusted {
		t.Fatalf("after the root left the bundle: %v, want untrusted", err)
	}
	src.b.Store(h.bundle(t))
	if _, _, err := v.Verify(chain, svid.RoleAny); err != nil {
		t.Fatalf("root back: %v", err)
	}
	// Another chain for the same leaf (its intermediate swapped for one
	// the root did not sign) is verified, not looked up.
	forged, _ := other.intermediate(t, "short intermediate", now.Add(-time.Hour), now.Add(10*time.Minute))
	if _, _, err := v.Verify([]*x509.Certificate{leaf, forged}, svid.RoleAny); err == nil {
		t.Fatal("a chain with a foreign intermediate verified")
	}
	// The intermediate expires before the leaf: refused from then on.
	now = now.Add(11 * time.Minute)
	if _, _, err := v.Verify(chain, svid.RoleAny); svid.ReasonOf(err) != svid.ReasonExpired {
		t.Fatalf("after the intermediate expired: %v, want expired", err)
	}
}

// BenchmarkVerify: the first verification of a chain, and the same chain
// again (remembered).
func BenchmarkVerify(b *testing.B) {
	c := catest.New(b, tdName)
	s := c.SVID(b, "spiffe://"+tdName+"/ns/a/sa/b", time.Hour)
	b.Run("first", func(b *testing.B) {
		for b.Loop() {
			v, err := svid.NewVerifier(svid.VerifierConfig{TrustDomain: c.Bundle().TrustDomain(), Bundles: c.Bundle()})
			if err != nil {
				b.Fatal(err)
			}
			if _, _, err := v.Verify(s.Certificates, svid.RoleAny); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("again", func(b *testing.B) {
		v, err := svid.NewVerifier(svid.VerifierConfig{TrustDomain: c.Bundle().TrustDomain(), Bundles: c.Bundle()})
		if err != nil {
			b.Fatal(err)
		}
		for b.Loop() {
			if _, _, err := v.Verify(s.Certificates, svid.RoleAny); err != nil {
				b.Fatal(err)
			}
		}
	})
}
