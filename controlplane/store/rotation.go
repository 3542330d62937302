package store

import (
	"encoding/json"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// RotationStep is one step of an automatic root rotation: when it was
// taken and when every cluster acknowledged it.
type RotationStep struct {
	Step         string    `json:"step"`
	Taken        time.Time `json:"taken"`
	Acknowledged time.Time `json:"acknowledged,omitzero"`
}

// AutoRotation is the record of the latest automatic root rotation, kept
// so that it resumes after a restart of the root authority.
type AutoRotation struct {
	Running   bool           `json:"running"`
	Started   time.Time      `json:"started"`
	RootTTL   time.Duration  `json:"root_ttl,omitempty"`
	Steps     []RotationStep `json:"steps,omitempty"`
	LastError string         `json:"last_error,omitempty"`
	Done      bool           `json:"done,omitempty"`
}

var keyAutoRotation = []byte("auto")

// PutAutoRotation stores the automatic rotation's record. It does not
// change the configuration revision.
func (s *Store) PutAutoRotation(r AutoRotation) error {
	return s.mutate(func(tx *bolt.Tx) (bool, error) {
		return false, putJSON(tx.Bucket(bucketRotation), keyAutoRotation, r)
	})
}

// GetAutoRotation returns the record, or a zero one if none was stored.
func (s *Store) GetAutoRotation() (AutoRotation, error) {
	var r AutoRotation
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketRotation).Get(keyAutoRotation)
		if v == nil {
			return nil
		}
		if err := json.Unmarshal(v, &r); err != nil {
			return fmt.Errorf("%w: automatic rotation record: %v", ErrCorrupt, err)
		}
		return nil
	})
	return r, err
}
