package ca

import (
	"context"
	"crypto"
	"crypto/rand"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"go.step.sm/crypto/kms"
	kmsapi "go.step.sm/crypto/kms/apiv1"
	_ "go.step.sm/crypto/kms/softkms" // registers the default, file-backed KMS
	"go.step.sm/crypto/pemutil"

	"github.com/straitmesh/strait/internal/atomicfile"
)

// Files in a data directory.
const (
	stateFile      = "state.json"
	bundleJWKSFile = "bundle.json"
	bundlePEMFile  = "bundle.pem"
	lockFile       = "lock"
	keysDir        = "keys"
)

// writeFileAtomic replaces path crash-safely (see internal/atomicfile).
// testHookBeforeRename, when set, runs at the commit point.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	return atomicfile.WriteFileHook(path, data, perm, testHookBeforeRename)
}

var testHookBeforeRename func(path string) error

// dirLock is an exclusive advisory lock on a data directory, so that two
// processes never mutate one authority at once.
type dirLock struct{ f *os.File }

func lockDir(dir string) (*dirLock, error) {
	f, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s", ErrBusy, dir)
		}
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return &dirLock{f: f}, nil
}

func (l *dirLock) unlock() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close() // closing releases the flock
	l.f = nil
	return err
}

// keyStore creates and loads signing keys through the smallstep KMS
// abstraction. With no KMS URI it is softkms with keys as 0600 PEM files
// under DIR/keys; with a URI, keys live in that KMS and only their names are
// stored.
type keyStore struct {
	dir string
	uri string // "" for the file-backed default
	km  kmsapi.KeyManager
}

func openKeyStore(ctx context.Context, dir, uri string) (*keyStore, error) {
	opts := kmsapi.Options{Type: kmsapi.SoftKMS}
	if uri != "" {
		opts = kmsapi.Options{URI: uri}
		t, err := opts.GetType()
		if err != nil {
			return nil, fmt.Errorf("KMS URI %q: %w", uri, err)
		}
		if t == kmsapi.SoftKMS {
			// softkms keeps no keys of its own: it is the file-backed default.
			opts, uri = kmsapi.Options{Type: kmsapi.SoftKMS}, ""
		}
	}
	km, err := kms.New(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("open KMS %q: %w", uri, err)
	}
	return &keyStore{dir: dir, uri: uri, km: km}, nil
}

func (k *keyStore) close() error { return k.km.Close() }

// create makes a new ECDSA P-256 key named after purpose and returns the
// reference to store and a signer for it.
func (k *keyStore) create(purpose string) (string, crypto.Signer, error) {
	suffix := make([]byte, 6)
	if _, err := rand.Read(suffix); err != nil {
		return "", nil, err
	}
	name := purpose + "-" + hex.EncodeToString(suffix)
	if k.uri == "" {
		name = filepath.Join(keysDir, name+".key")
	}
	resp, err := k.km.CreateKey(&kmsapi.CreateKeyRequest{Name: name, SignatureAlgorithm: kmsapi.ECDSAWithSHA256})
	if err != nil {
		return "", nil, fmt.Errorf("create key %s: %w", name, err)
	}
	if k.uri == "" {
		block, err := pemutil.Serialize(resp.PrivateKey)
		if err != nil {
			return "", nil, fmt.Errorf("encode key: %w", err)
		}
		if err := os.MkdirAll(filepath.Join(k.dir, keysDir), 0o700); err != nil {
			return "", nil, err
		}
		if err := writeFileAtomic(filepath.Join(k.dir, name), pem.EncodeToMemory(block), 0o600); err != nil {
			return "", nil, fmt.Errorf("write key %s: %w", name, err)
		}
	}
	signer, err := k.km.CreateSigner(&resp.CreateSignerRequest)
	if err != nil {
		return "", nil, fmt.Errorf("load new key %s: %w", name, err)
	}
	return name, signer, nil
}

// signer loads the key stored under ref.
func (k *keyStore) signer(ref string) (crypto.Signer, error) {
	req := &kmsapi.CreateSignerRequest{SigningKey: ref}
	if k.uri == "" {
		path, err := k.path(ref)
		if err != nil {
			return nil, err
		}
		req.SigningKey = path
	}
	s, err := k.km.CreateSigner(req)
	if err != nil {
		return nil, fmt.Errorf("load key %s: %w", ref, err)
	}
	return s, nil
}

// path resolves a file-backed key reference, which must stay under keys/.
func (k *keyStore) path(ref string) (string, error) {
	clean := filepath.Clean(ref)
	if filepath.IsAbs(ref) || clean != ref || !strings.HasPrefix(clean, keysDir+string(filepath.Separator)) || strings.Contains(clean, "..") {
		return "", fmt.Errorf("key reference %q is not a file under %s/", ref, keysDir)
	}
	return filepath.Join(k.dir, clean), nil
}

// destroy removes a file-backed key. KMS-held keys are left to the KMS's own
// lifecycle (most refuse deletion by API, by design).
func (k *keyStore) destroy(ref string) error {
	if k.uri != "" || ref == "" {
		return nil
	}
	path, err := k.path(ref)
	if err != nil {
		return err
	}
	err = os.Remove(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}
