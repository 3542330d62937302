// Package store keeps a Strait control plane's durable state in local mode:
// the resources applied with `strait apply`, the single-use workload
// registration tokens, the instances of the local service registry, and a
// revision counter that versions the snapshots the control plane serves.
//
// Everything lives in one bbolt file (https://github.com/etcd-io/bbolt).
// Every mutating method is one read-write transaction, committed and fsynced
// before the method returns: a crash at any instant, SIGKILL included, loses
// nothing that was acknowledged and applies nothing partially. The file is
// locked while open; a second control plane opening it fails fast with
// ErrInUse instead of hanging.
//
// The store validates only what it needs to keep its keys sound (names,
// lengths, well-formed JSON). It knows nothing of gRPC, the CA, trust
// domains or leases: the admin API validates resource semantics, and the
// registry package (controlplane/registry) owns instance policy such as
// leases and who may register what.
package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// SchemaVersion is the layout of the buckets this package reads and writes.
// Open refuses a file with a newer schema and migrates an older one.
const SchemaVersion = 1

// DefaultLockTimeout is how long Open waits for another process to release
// the file when Options.LockTimeout is zero.
const DefaultLockTimeout = 2 * time.Second

// Bucket and key names. Changing any of them needs a schema migration.
var (
	bucketMeta      = []byte("meta")
	bucketResources = []byte("resources")
	bucketTokens    = []byte("tokens")
	bucketInstances = []byte("instances")
	bucketBindings  = []byte("bindings")
	bucketJoin      = []byte("jointokens")
	bucketLinks     = []byte("links")
	bucketAudit     = []byte("audit")
	bucketRefusals  = []byte("audit-refused") // join-refused audit events (added without a schema change: created at open)
	bucketRotation  = []byte("rotation")

	keySchema   = []byte("schema")
	keyRevision = []byte("revision")
)

// Errors returned by the store. Callers test them with errors.Is; the
// returned errors add which record or field was at fault.
var (
	// ErrInUse means another process (or another Store in this process)
	// holds the file.
	ErrInUse = errors.New("store: in use by another control plane")
	// ErrNotFound means the named record does not exist.
	ErrNotFound = errors.New("store: not found")
	// ErrInvalid means an argument failed validation; nothing was stored.
	ErrInvalid = errors.New("store: invalid argument")
	// ErrCorrupt means a stored record could not be decoded.
	ErrCorrupt = errors.New("store: corrupt record")
	// ErrSchema means the file was written by a newer, incompatible version.
	ErrSchema = errors.New("store: unsupported schema version")
)

// inUseError names the file that is locked, as in
// "store: /var/lib/strait/state.db is in use by another control plane".
type inUseError struct{ path string }

func (e *inUseError) Error() string {
	return "store: " + e.path + " is in use by another control plane"
}

func (e *inUseError) Is(target error) bool { return target == ErrInUse }

// Options configure Open. The zero value is ready to use.
type Options struct {
	// Clock returns the current time. Nil means time.Now. Token creation,
	// expiry and redemption and default instance timestamps use it.
	Clock func() time.Time
	// Logger receives the store's few log lines (schema creation and
	// migration). Nil discards them.
	Logger *slog.Logger
	// LockTimeout bounds how long Open waits for the file lock before
	// failing with ErrInUse. Zero means DefaultLockTimeout.
	LockTimeout time.Duration
}

// Store is the control plane's durable state. It is safe for concurrent use.
type Store struct {
	db    *bolt.DB
	path  string
	clock func() time.Time
	log   *slog.Logger

	// rev caches the last committed revision so Revision needs no
	// transaction. It only ever grows (see committed).
	rev atomic.Uint64

	mu     sync.Mutex
	subs   map[uint64]chan struct{}
	nextID uint64
}

// Open opens (creating if needed) the store at path. The file is created
// with mode 0600; its directory must exist. Open fails with an error
// wrapping ErrInUse if another process holds the file for longer than
// opts.LockTimeout.
func Open(path string, opts Options) (*Store, error) {
	clock := opts.Clock
	if clock == nil {
		clock = time.Now
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	timeout := opts.LockTimeout
	if timeout <= 0 {
		timeout = DefaultLockTimeout
	}
	_, statErr := os.Stat(path)
	created := errors.Is(statErr, fs.ErrNotExist)

	db, err := openBolt(path, timeout)
	if err != nil {
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, &inUseError{path: path}
		}
		return nil, fmt.Errorf("store: open %s: %w", path, err)
	}
	s := &Store{db: db, path: path, clock: clock, log: logger, subs: map[uint64]chan struct{}{}}

	var rev uint64
	if err := corruptOnPanic(path, func() error {
		return db.Update(func(tx *bolt.Tx) error {
			var err error
			rev, err = s.initSchema(tx)
			return err
		})
	}); err != nil {
		db.Close()
		return nil, err
	}
	if created {
		// bbolt fsyncs the file but not the directory entry that names it.
		if err := syncDir(filepath.Dir(path)); err != nil {
			db.Close()
			return nil, fmt.Errorf("store: sync directory of %s: %w", path, err)
		}
	}
	s.rev.Store(rev)
	return s, nil
}

// openBolt opens the bbolt file at path. bbolt panics on some damaged
// pages (a freelist or bucket page that is not what the meta page says):
// that is reported as a corrupt file, not a crash.
func openBolt(path string, timeout time.Duration) (db *bolt.DB, err error) {
	err = corruptOnPanic(path, func() error {
		var openErr error
		db, openErr = bolt.Open(path, 0o600, &bolt.Options{
			Timeout:      timeout,
			FreelistType: bolt.FreelistMapType,
		})
		return openErr
	})
	return db, err
}

// corruptOnPanic runs f and turns a panic in it (bbolt's reaction to a
// damaged page) into an error wrapping ErrCorrupt.
func corruptOnPanic(path string, f func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: %s is damaged (%v); restore it from a backup or move it aside", ErrCorrupt, path, r)
		}
	}()
	return f()
}

// initSchema creates the buckets of a new file, checks the schema version of
// an existing one, and returns the current revision.
func (s *Store) initSchema(tx *bolt.Tx) (uint64, error) {
	meta, err := tx.CreateBucketIfNotExists(bucketMeta)
	if err != nil {
		return 0, fmt.Errorf("store: create meta bucket: %w", err)
	}
	var version uint64
	switch v := meta.Get(keySchema); {
	case v == nil:
		s.log.Info("creating state store", "path", s.path, "schema", SchemaVersion)
		if err := meta.Put(keySchema, u64(SchemaVersion)); err != nil {
			return 0, err
		}
		// Revision 0 never names a snapshot: proto3 cannot tell it from unset.
		if err := meta.Put(keyRevision, u64(1)); err != nil {
			return 0, err
		}
		version = SchemaVersion
	case len(v) != 8:
		return 0, fmt.Errorf("%w: schema version is %d bytes", ErrCorrupt, len(v))
	default:
		version = binary.BigEndian.Uint64(v)
	}
	if version > SchemaVersion {
		return 0, fmt.Errorf("%w: %s has schema %d; this binary supports up to %d", ErrSchema, s.path, version, SchemaVersion)
	}
	// Migrations from older schemas go here, each in this transaction.
	for _, name := range [][]byte{bucketResources, bucketTokens, bucketInstances, bucketBindings, bucketJoin, bucketLinks, bucketAudit, bucketRefusals, bucketRotation} {
		if _, err := tx.CreateBucketIfNotExists(name); err != nil {
			return 0, fmt.Errorf("store: create bucket %s: %w", name, err)
		}
	}
	return readRevision(meta)
}

// Close closes the file and releases its lock.
func (s *Store) Close() error {
	return s.db.Close()
}

// Path returns the file the store was opened from.
func (s *Store) Path() string { return s.path }

// Revision returns the current revision. It starts at 1 in a new store,
// grows with every committed change to resources or instances (and every
// BumpRevision), and never goes backwards, across restarts included: the
// control plane uses it as the version of the snapshots it serves. A
// heartbeat that leaves an instance's health as it was does not change it.
func (s *Store) Revision() uint64 { return s.rev.Load() }

// BumpRevision advances the revision and notifies subscribers without
// changing any record, and returns the new revision. It is for versioning
// changes the store cannot see but that change what the control plane
// serves, such as an instance's lease running out or a new trust bundle.
func (s *Store) BumpRevision() (uint64, error) {
	return s.update(func(*bolt.Tx) (bool, error) { return true, nil })
}

func readRevision(meta *bolt.Bucket) (uint64, error) {
	v := meta.Get(keyRevision)
	if len(v) != 8 {
		return 0, fmt.Errorf("%w: revision is %d bytes", ErrCorrupt, len(v))
	}
	return binary.BigEndian.Uint64(v), nil
}

func bumpRevision(tx *bolt.Tx) (uint64, error) {
	meta := tx.Bucket(bucketMeta)
	rev, err := readRevision(meta)
	if err != nil {
		return 0, err
	}
	rev++
	return rev, meta.Put(keyRevision, u64(rev))
}

// update runs fn in one read-write transaction. If fn reports a change, the
// revision is bumped in the same transaction and, once committed,
// subscribers are notified. It returns the new revision, or 0 if nothing
// changed.
func (s *Store) update(fn func(tx *bolt.Tx) (changed bool, err error)) (uint64, error) {
	return s.run(s.db.Update, fn)
}

// mutate is update for callers that do not need the revision.
func (s *Store) mutate(fn func(tx *bolt.Tx) (changed bool, err error)) error {
	_, err := s.update(fn)
	return err
}

// batch is update through bolt's Batch: concurrent calls share one
// transaction and one fsync. fn may run more than once and must be
// idempotent.
func (s *Store) batch(fn func(tx *bolt.Tx) (changed bool, err error)) error {
	_, err := s.run(s.db.Batch, fn)
	return err
}

func (s *Store) run(txn func(func(*bolt.Tx) error) error, fn func(tx *bolt.Tx) (bool, error)) (uint64, error) {
	var rev uint64
	err := txn(func(tx *bolt.Tx) error {
		rev = 0 // fn may be retried by Batch
		changed, err := fn(tx)
		if err != nil || !changed {
			return err
		}
		rev, err = bumpRevision(tx)
		return err
	})
	if err != nil {
		return 0, err
	}
	if rev != 0 {
		s.committed(rev)
	}
	return rev, nil
}

// committed records a committed revision and wakes subscribers. Commits
// finish in revision order but their goroutines may get here out of order,
// so the cache only moves forward.
func (s *Store) committed(rev uint64) {
	for {
		cur := s.rev.Load()
		if rev <= cur || s.rev.CompareAndSwap(cur, rev) {
			break
		}
	}
	s.notify()
}

// Subscribe returns a channel that receives after every committed change to
// resources or instances (and every BumpRevision), and a function that ends
// the subscription. Notifications coalesce: the channel holds at most one,
// and a burst of changes may produce a single receive, so a subscriber
// re-reads the state it cares about after each receive. Token operations and
// heartbeats that do not change health do not notify. The channel is never
// closed.
func (s *Store) Subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	s.mu.Lock()
	id := s.nextID
	s.nextID++
	s.subs[id] = ch
	s.mu.Unlock()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			s.mu.Lock()
			delete(s.subs, id)
			s.mu.Unlock()
		})
	}
}

func (s *Store) notify() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ch := range s.subs {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

func u64(v uint64) []byte {
	return binary.BigEndian.AppendUint64(nil, v)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
