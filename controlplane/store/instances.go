package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// ErrInstanceOwned means the instance exists and belongs to another SPIFFE
// ID: a workload may only overwrite, report on or delete its own instances.
var ErrInstanceOwned = errors.New("store: instance is owned by another identity")

// Instance is one workload instance in the local registry. The store checks
// only that Name and SPIFFEID are set; controlplane/registry validates the
// rest.
type Instance struct {
	Name, Service, Namespace, Address string
	Protocol                          controlplanev1.Protocol
	Region, Zone                      string
	// SPIFFEID is the owner: the identity that registered the instance.
	SPIFFEID string
	// Health is the last reported health (not the lease-adjusted one).
	Health controlplanev1.Health
	// LastSeen is the last registration or health report.
	LastSeen time.Time
	// Registered is when the instance was first registered.
	Registered time.Time
}

type instanceValue struct {
	Service    string    `json:"service"`
	Namespace  string    `json:"namespace"`
	Address    string    `json:"address"`
	Protocol   int32     `json:"protocol"`
	Region     string    `json:"region,omitempty"`
	Zone       string    `json:"zone,omitempty"`
	SPIFFEID   string    `json:"spiffeID"`
	Health     int32     `json:"health"`
	LastSeen   time.Time `json:"lastSeen"`
	Registered time.Time `json:"registered"`
}

func encodeInstance(in Instance) ([]byte, error) {
	return json.Marshal(instanceValue{
		Service: in.Service, Namespace: in.Namespace, Address: in.Address, Protocol: int32(in.Protocol),
		Region: in.Region, Zone: in.Zone, SPIFFEID: in.SPIFFEID, Health: int32(in.Health),
		LastSeen: in.LastSeen.UTC(), Registered: in.Registered.UTC(),
	})
}

func decodeInstance(name, v []byte) (Instance, error) {
	var iv instanceValue
	if err := json.Unmarshal(v, &iv); err != nil {
		return Instance{}, fmt.Errorf("%w: instance %q: %v", ErrCorrupt, name, err)
	}
	return Instance{
		Name: string(name), Service: iv.Service, Namespace: iv.Namespace, Address: iv.Address,
		Protocol: controlplanev1.Protocol(iv.Protocol), Region: iv.Region, Zone: iv.Zone, SPIFFEID: iv.SPIFFEID,
		Health: controlplanev1.Health(iv.Health), LastSeen: iv.LastSeen, Registered: iv.Registered,
	}, nil
}

func checkInstanceKey(name, spiffeID string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: instance name is empty", ErrInvalid)
	case len(name) > maxNameLen || strings.IndexByte(name, 0) >= 0:
		return fmt.Errorf("%w: instance name %q", ErrInvalid, trunc(name))
	case spiffeID == "":
		return fmt.Errorf("%w: instance %s: SPIFFE ID is empty", ErrInvalid, name)
	}
	return nil
}

// getOwned loads instance name and checks that spiffeID owns it.
func getOwned(b *bolt.Bucket, name, spiffeID string) (Instance, error) {
	v := b.Get([]byte(name))
	if v == nil {
		return Instance{}, fmt.Errorf("%w: instance %s", ErrNotFound, name)
	}
	in, err := decodeInstance([]byte(name), v)
	if err != nil {
		return Instance{}, err
	}
	if in.SPIFFEID != spiffeID {
		return Instance{}, fmt.Errorf("%w: instance %s belongs to %s", ErrInstanceOwned, name, in.SPIFFEID)
	}
	return in, nil
}

// PutInstance creates or replaces the instance named in.Name. If it exists
// with another SPIFFE ID, PutInstance fails with ErrInstanceOwned. An
// existing instance keeps its Registered time; otherwise a zero Registered
// or LastSeen is set to the store's clock. Every put bumps the revision.
func (s *Store) PutInstance(in Instance) error {
	if err := checkInstanceKey(in.Name, in.SPIFFEID); err != nil {
		return err
	}
	now := s.clock()
	return s.mutate(func(tx *bolt.Tx) (bool, error) {
		b := tx.Bucket(bucketInstances)
		put := in
		if old, err := getOwned(b, in.Name, in.SPIFFEID); err == nil {
			put.Registered = old.Registered
		} else if !errors.Is(err, ErrNotFound) {
			return false, err
		}
		if put.Registered.IsZero() {
			put.Registered = now
		}
		if put.LastSeen.IsZero() {
			put.LastSeen = now
		}
		v, err := encodeInstance(put)
		if err != nil {
			return false, err
		}
		return true, b.Put([]byte(in.Name), v)
	})
}

// GetInstance returns one instance, or an error wrapping ErrNotFound.
func (s *Store) GetInstance(name string) (Instance, error) {
	var in Instance
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketInstances).Get([]byte(name))
		if v == nil || name == "" {
			return fmt.Errorf("%w: instance %s", ErrNotFound, name)
		}
		var err error
		in, err = decodeInstance([]byte(name), v)
		return err
	})
	return in, err
}

// DeleteInstance removes instance name if spiffeID owns it. It fails with
// ErrNotFound or ErrInstanceOwned.
func (s *Store) DeleteInstance(name, spiffeID string) error {
	if err := checkInstanceKey(name, spiffeID); err != nil {
		return err
	}
	return s.mutate(func(tx *bolt.Tx) (bool, error) {
		b := tx.Bucket(bucketInstances)
		if _, err := getOwned(b, name, spiffeID); err != nil {
			return false, err
		}
		return true, b.Delete([]byte(name))
	})
}

// ListInstances returns every instance, sorted by name.
func (s *Store) ListInstances() ([]Instance, error) {
	var out []Instance
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketInstances).ForEach(func(k, v []byte) error {
			in, err := decodeInstance(k, v)
			if err != nil {
				return err
			}
			out = append(out, in)
			return nil
		})
	})
	return out, err
}

// SetHealth records a health report for instance name, owned by spiffeID,
// made at time at: it sets the health and moves LastSeen forward to at (never
// back, as reports may be applied out of order).
//
// Reports arrive every few seconds from every sidecar, so they go through
// bbolt's Batch: concurrent reports share one transaction and one fsync,
// which bounds the write load at about one commit per batch window (10ms)
// however many sidecars report. A report is durable when SetHealth returns.
// The revision is bumped, and subscribers notified, only when the health
// changes: a plain heartbeat changes nothing the control plane serves.
func (s *Store) SetHealth(name, spiffeID string, h controlplanev1.Health, at time.Time) error {
	if err := checkInstanceKey(name, spiffeID); err != nil {
		return err
	}
	if _, ok := controlplanev1.Health_name[int32(h)]; !ok || h == controlplanev1.Health_HEALTH_UNSPECIFIED {
		return fmt.Errorf("%w: health %d", ErrInvalid, h)
	}
	return s.batch(func(tx *bolt.Tx) (bool, error) {
		b := tx.Bucket(bucketInstances)
		in, err := getOwned(b, name, spiffeID)
		if err != nil {
			return false, err
		}
		changed := in.Health != h
		in.Health = h
		if at.After(in.LastSeen) {
			in.LastSeen = at
		}
		v, err := encodeInstance(in)
		if err != nil {
			return false, err
		}
		return changed, b.Put([]byte(name), v)
	})
}
