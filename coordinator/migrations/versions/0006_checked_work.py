"""checked work: sampled checks of kept reports, quarantine, and each lineage record's verification

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 10:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('peer_id', sa.String(length=128), server_default='', nullable=False))
        batch_op.add_column(sa.Column('passed_checks', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('quarantined_at', sa.Double(), nullable=True))
        batch_op.add_column(sa.Column('quarantine_round', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('quarantine_check', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('quarantine_reason', sa.Text(), server_default='', nullable=False))

    with op.batch_alter_table('round_reports', schema=None) as batch_op:
        batch_op.add_column(sa.Column('peer_id', sa.String(length=128), server_default='', nullable=False))
        batch_op.add_column(sa.Column('evidence', sa.LargeBinary(), nullable=True))

    with op.batch_alter_table('lineage', schema=None) as batch_op:
        batch_op.add_column(sa.Column('verification', sa.String(length=16), server_default='unverified',
                                      nullable=False))
        batch_op.create_index('ix_lineage_worker_round', ['worker_id', 'round'], unique=False)

    op.create_table(
        'checks',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('worker_id', sa.String(length=64), nullable=False),
        sa.Column('round', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('trigger', sa.String(length=256), nullable=False),
        sa.Column('created_at', sa.Double(), nullable=False),
        sa.Column('validator_id', sa.String(length=64), nullable=True),
        sa.Column('assigned_at', sa.Double(), nullable=True),
        sa.Column('decided_at', sa.Double(), nullable=True),
        sa.Column('inconclusive', sa.Integer(), server_default='0', nullable=False),
        sa.Column('reason', sa.Text(), server_default='', nullable=False),
        sa.Column('exact', sa.Boolean(), nullable=True),
        sa.Column('cosine', sa.Double(), nullable=True),
        sa.Column('norm_ratio', sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(['worker_id'], ['workers.id']),
        sa.ForeignKeyConstraint(['validator_id'], ['workers.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('worker_id', 'round'),
    )
    with op.batch_alter_table('checks', schema=None) as batch_op:
        batch_op.create_index('ix_checks_status', ['status', 'id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('checks', schema=None) as batch_op:
        batch_op.drop_index('ix_checks_status')
    op.drop_table('checks')

    with op.batch_alter_table('lineage', schema=None) as batch_op:
        batch_op.drop_index('ix_lineage_worker_round')
        batch_op.drop_column('verification')

    with op.batch_alter_table('round_reports', schema=None) as batch_op:
        batch_op.drop_column('evidence')
        batch_op.drop_column('peer_id')

    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('quarantine_reason')
        batch_op.drop_column('quarantine_check')
        batch_op.drop_column('quarantine_round')
        batch_op.drop_column('quarantined_at')
        batch_op.drop_column('passed_checks')
        batch_op.drop_column('peer_id')
