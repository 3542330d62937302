package bundlesig_test

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/bundlesig"
	"github.com/straitmesh/strait/ca/svid"
)

var update = flag.Bool("update", false, "rewrite the checked-in seed corpus under testdata/fuzz/FuzzVerify")

// fuzzCurrent is the bundle the fuzzed receiver holds: the fixed root A at
// sequence 5, so that checked-in seeds signed by A stay valid.
func fuzzCurrent(t testing.TB) *bundle.Bundle {
	return mustBundle(t, 5, loadRoot(t, "root-a"))
}

// seeds are valid tokens and near misses against fuzzCurrent.
func seeds(t testing.TB) map[string]string {
	a, b := loadRoot(t, "root-a"), loadRoot(t, "root-b")
	sign := func(bb *bundle.Bundle, r testRoot) string {
		token, err := bundlesig.Sign(bb, r.cert, r.key)
		if err != nil {
			t.Fatal(err)
		}
		return token
	}
	valid := sign(mustBundle(t, 6, a, b), a)
	parts := strings.Split(valid, ".")
	hdr := map[string]any{"alg": "ES256", "kid": a.kid(), "typ": bundlesig.Type}
	return map[string]string{
		"valid-prepare":     valid,
		"valid-same-roots":  sign(mustBundle(t, 1<<40, a), a),
		"not-newer":         sign(mustBundle(t, 5, a, b), a),
		"untrusted-signer":  sign(mustBundle(t, 6, a, b), b),
		"drops-signer":      forge(t, hdr, mustJWKS(t, mustBundle(t, 6, b)), a.key),
		"tampered-payload":  parts[0] + "." + b64(mustJWKS(t, mustBundle(t, 7, a, b))) + "." + parts[2],
		"truncated":         valid[:len(valid)/2],
		"alg-none":          forge(t, map[string]any{"alg": "none", "kid": a.kid(), "typ": bundlesig.Type}, mustJWKS(t, mustBundle(t, 6, a)), nil),
		"payload-not-jwks":  forge(t, hdr, []byte(`{"keys":[{"kty":"EC","use":"x509-svid"}],"spiffe_sequence":6}`), a.key),
		"header-duplicates": b64([]byte(`{"alg":"ES256","kid":"x","kid":"`+a.kid()+`","typ":"`+bundlesig.Type+`"}`)) + "." + parts[1] + "." + parts[2],
		"garbage":           "e30.e30.",
	}
}

// FuzzVerify feeds arbitrary tokens to Verify. It must never panic, and a
// bundle it accepts must be newer than the one held and contain the root
// that signed it, which must be a root of the bundle held.
func FuzzVerify(f *testing.F) {
	current := fuzzCurrent(f)
	for _, s := range seeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, token string) {
		next, err := bundlesig.Verify(current, token)
		if err != nil {
			if next != nil && !errors.Is(err, bundlesig.ErrNotNewer) {
				t.Fatalf("Verify returned a bundle with error %v", err)
			}
			if next != nil && next.Sequence() > current.Sequence() {
				t.Fatalf("Verify returned sequence %d, holding %d, with %v", next.Sequence(), current.Sequence(), err)
			}
			if !errors.Is(err, bundlesig.ErrInvalid) && !errors.Is(err, bundlesig.ErrNotNewer) {
				t.Fatalf("Verify error %v is neither ErrInvalid nor ErrNotNewer", err)
			}
			return
		}
		if next.Sequence() <= current.Sequence() {
			t.Fatalf("accepted sequence %d, holding %d", next.Sequence(), current.Sequence())
		}
		kid := unverifiedKid(token)
		var inCurrent, inNext bool
		for _, r := range current.Roots() {
			inCurrent = inCurrent || svid.Fingerprint(r) == kid
		}
		for _, r := range next.Roots() {
			inNext = inNext || svid.Fingerprint(r) == kid
		}
		if !inCurrent || !inNext {
			t.Fatalf("accepted a bundle signed by %q: in the held bundle %v, in the new one %v; want both", kid, inCurrent, inNext)
		}
	})
}

func unverifiedKid(token string) string {
	enc, _, _ := strings.Cut(token, ".")
	raw, _ := base64.RawURLEncoding.DecodeString(enc)
	var h struct {
		Kid string `json:"kid"`
	}
	_ = json.Unmarshal(raw, &h)
	return h.Kid
}

// TestSeedCorpus keeps the checked-in corpus honest: its valid seeds still
// verify against fuzzCurrent (so the fuzzer starts from accepted input), and
// -update rewrites it from seeds.
func TestSeedCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzVerify")
	if *update {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, s := range seeds(t) {
			data := fmt.Sprintf("go test fuzz v1\nstring(%s)\n", strconv.Quote(s))
			if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	files, err := filepath.Glob(filepath.Join(dir, "*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("seed corpus in %s: %d files, %v; run go test -run TestSeedCorpus -update", dir, len(files), err)
	}
	current := fuzzCurrent(t)
	accepted := 0
	for _, path := range files {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		body, ok := strings.CutPrefix(string(data), "go test fuzz v1\nstring(")
		body, ok2 := strings.CutSuffix(strings.TrimSpace(body), ")")
		if !ok || !ok2 {
			t.Fatalf("%s: not a one-string fuzz corpus file", path)
		}
		token, err := strconv.Unquote(body)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		_, err = bundlesig.Verify(current, token)
		switch valid := strings.HasPrefix(filepath.Base(path), "valid-"); {
		case valid && err != nil:
			t.Errorf("%s: got %v, want accepted", path, err)
		case !valid && err == nil:
			t.Errorf("%s: accepted, want refused", path)
		case err == nil:
			accepted++
		}
	}
	if accepted == 0 {
		t.Error("no seed in the corpus is accepted; the fuzzer would only explore refusals")
	}
}

// FuzzVerifyFrom feeds arbitrary tokens to a receiver that holds a bundle
// signed by root A announcing root B. It must never panic, and a bundle it
// accepts must come from A or B.
func FuzzVerifyFrom(f *testing.F) {
	a, b := loadRoot(f, "root-a"), loadRoot(f, "root-b")
	current := mustBundle(f, 5, a, b)
	held, err := bundlesig.SignWithSuccessor(current, a.cert, a.key, b.cert)
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range seeds(f) {
		f.Add(s)
	}
	for _, signer := range []testRoot{a, b} {
		for _, seq := range []uint64{5, 6} {
			token, err := bundlesig.Sign(mustBundle(f, seq, a, b), signer.cert, signer.key)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(token)
		}
	}
	f.Fuzz(func(t *testing.T, token string) {
		next, err := bundlesig.VerifyFrom(current, held, token)
		if err != nil {
			return
		}
		hdr := header(t, token)
		if kid := hdr["kid"]; kid != a.kid() && kid != b.kid() {
			t.Fatalf("accepted a bundle signed by %v, neither the signer held nor its successor", kid)
		}
		if next.Sequence() < current.Sequence() {
			t.Fatalf("accepted sequence %d, holding %d", next.Sequence(), current.Sequence())
		}
	})
}
