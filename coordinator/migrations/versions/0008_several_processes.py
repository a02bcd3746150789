"""several processes: leases by round, pending stakes and quarantined workers indexed (read at each report), nonces shared by processes

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 17:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index('ix_leases_round_state', ['round', 'state'], unique=False)
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.create_index('ix_workers_quarantined_at', ['quarantined_at'], unique=False)
    with op.batch_alter_table('round_reports', schema=None) as batch_op:
        batch_op.create_index('ix_round_reports_stakes', ['round', 'outcome', 'params_digest', 'held_tokens',
                                                          'received_at', 'worker_id'], unique=False)

    op.create_table(
        'request_nonces',
        sa.Column('worker_id', sa.String(length=64), nullable=False),
        sa.Column('nonce', sa.LargeBinary(length=16), nullable=False),
        sa.Column('forget_at', sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint('worker_id', 'nonce'),
    )
    with op.batch_alter_table('request_nonces', schema=None) as batch_op:
        batch_op.create_index('ix_request_nonces_forget_at', ['forget_at'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('request_nonces')
    with op.batch_alter_table('round_reports', schema=None) as batch_op:
        batch_op.drop_index('ix_round_reports_stakes')
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_index('ix_workers_quarantined_at')
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_index('ix_leases_round_state')
