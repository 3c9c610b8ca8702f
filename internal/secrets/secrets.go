// Package secrets reads the values that `${secret:NAME}` references in a
// rule's inject headers stand for, and expands those templates.
//
// A secret is a file named NAME in systemd's credentials directory
// ($CREDENTIALS_DIRECTORY, so LoadCredential= in the unit works) or in the
// config's secrets_dir, looked up in that order. The file must be a regular
// file owned by root with no permission for group or others (0600 or
// stricter); anything looser is an error, never a warning. Files are read
// on every use, so a changed secret is picked up without a restart.
//
// No error of this package ever carries a secret's value: errors name the
// secret and its file only.
package secrets

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
)

// MaxSize bounds a secret file: a header value, not a document.
const MaxSize = 8 << 10

// nameRE is a secret name: a file name without path or leading dot.
var nameRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$`)

// ValidName reports whether name may be a secret's name.
func ValidName(name string) bool { return nameRE.MatchString(name) }

// Template is a header value with `${secret:NAME}` references, parsed.
type Template struct {
	// parts alternate literal text and secret names: even indexes are
	// literals, odd ones names.
	parts []string
}

const refOpen, refClose = "${secret:", "}"

// Parse parses a header value template. Literal text may hold any byte but
// CR, LF and NUL; "${" must start a `${secret:NAME}` reference.
func Parse(s string) (Template, error) {
	if strings.ContainsAny(s, "\r\n\x00") {
		return Template{}, errors.New("value holds a line break or NUL")
	}
	var t Template
	rest := s
	for {
		i := strings.Index(rest, "${")
		if i < 0 {
			t.parts = append(t.parts, rest)
			return t, nil
		}
		t.parts = append(t.parts, rest[:i])
		rest = rest[i:]
		if !strings.HasPrefix(rest, refOpen) {
			return Template{}, fmt.Errorf("%q: \"${\" must start a ${secret:NAME} reference", s)
		}
		end := strings.Index(rest, refClose)
		if end < 0 {
			return Template{}, fmt.Errorf("%q: ${secret: without a closing }", s)
		}
		name := rest[len(refOpen):end]
		if !ValidName(name) {
			return Template{}, fmt.Errorf("%q: secret name %q must be letters, digits, '_', '.', '-' (at most 64, not starting with '.' or '-')", s, name)
		}
		t.parts = append(t.parts, name)
		rest = rest[end+len(refClose):]
	}
}

// Names returns the secrets the template references, in order.
func (t Template) Names() []string {
	var out []string
	for i := 1; i < len(t.parts); i += 2 {
		out = append(out, t.parts[i])
	}
	return out
}

// Expand returns the value with every reference replaced by get(NAME).
func (t Template) Expand(get func(name string) (string, error)) (string, error) {
	var b strings.Builder
	for i, p := range t.parts {
		if i%2 == 0 {
			b.WriteString(p)
			continue
		}
		v, err := get(p)
		if err != nil {
			return "", err
		}
		b.WriteString(v)
	}
	return b.String(), nil
}

// Store finds secrets in its directories. The zero value finds none.
type Store struct {
	// Dirs are searched in order ($CREDENTIALS_DIRECTORY, then secrets_dir);
	// empty entries are skipped.
	Dirs []string
	// Owner is the uid secret files must belong to (root: 0).
	Owner uint32
}

// New returns the store for the daemon: $CREDENTIALS_DIRECTORY (as given
// by credsDir) and then secretsDir, files owned by root.
func New(credsDir, secretsDir string) *Store {
	return &Store{Dirs: []string{credsDir, secretsDir}}
}

// ErrNotFound: no directory of the store holds the secret.
var ErrNotFound = errors.New("secret not found")

// Get reads secret name. A final newline (as `echo` writes) is dropped; a
// value that still holds CR, LF or NUL is refused (it would split the
// header it goes into).
func (s *Store) Get(name string) (string, error) {
	if !ValidName(name) {
		return "", fmt.Errorf("reading secret %q: not a valid secret name", name)
	}
	var looked []string
	for _, dir := range s.Dirs {
		if dir == "" {
			continue
		}
		path := filepath.Join(dir, name)
		v, err := s.read(path)
		if errors.Is(err, os.ErrNotExist) {
			looked = append(looked, dir)
			continue
		}
		if err != nil {
			return "", fmt.Errorf("reading secret %q: %w", name, err)
		}
		return v, nil
	}
	if len(looked) == 0 {
		return "", fmt.Errorf("reading secret %q: %w (no credentials directory or secrets_dir is set)", name, ErrNotFound)
	}
	return "", fmt.Errorf("reading secret %q: %w in %s", name, ErrNotFound, strings.Join(looked, ", "))
}

// read opens path without following a final symlink, checks the open
// file's owner and mode, and reads it.
func (s *Store) read(path string) (string, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return "", fmt.Errorf("%s is a symbolic link; secret files must be regular files", path)
		}
		return "", err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", err
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("%s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return "", fmt.Errorf("%s has permissions %#o; a secret file must be 0600 or stricter (chmod 600 %s)", path, perm, path)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != s.Owner {
		return "", fmt.Errorf("%s is owned by uid %d; a secret file must be owned by uid %d", path, st.Uid, s.Owner)
	}
	b, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return "", err
	}
	if len(b) > MaxSize {
		return "", fmt.Errorf("%s is larger than %d bytes", path, MaxSize)
	}
	v := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	if strings.ContainsAny(v, "\r\n\x00") {
		return "", fmt.Errorf("%s holds a line break or NUL inside its value", path)
	}
	return v, nil
}

// Check reads every secret named, so that a missing or badly protected
// one is reported at load, not at the first request; the errors of all
// of them are joined.
func (s *Store) Check(names []string) error {
	var errs []error
	for _, n := range names {
		if _, err := s.Get(n); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
